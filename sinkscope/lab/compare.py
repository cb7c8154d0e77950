"""The comparison: train every variant, then compare loss curves, Sink_1^eps over steps, the
final alpha maps and the convergence of head-wise RMSNorm against softmax over seeds.

``run_comparison(out, CompareConfig(...))`` writes into ``out``:

``runs/<variant>-s<seed>/``
    one :func:`sinkscope.lab.train.train` run each (resumable: re-running skips finished runs
    and resumes interrupted ones);
``results.json`` (schema ``sinkscope.lab.compare/1``)
    configs, per-run curves, final metrics, steps-to-target, the bridge measurement of every
    final checkpoint and the throughput ratio;

``report.md`` and ``loss_curves.png``, ``sink_rate.png``, ``alpha_maps.png``, ``convergence.png``.

The expectations under test (Gu et al., Li et al.): the softmax baseline develops a
first-token sink; sigmoid-nonorm stays near 0; key-bias moves the mass onto the bias slot;
head-rmsnorm reaches the baseline's loss in fewer steps (``seeded`` variants run every seed).
The report states what was measured, with the spread over seeds, whichever way it comes out.

Convergence metric: for a target validation loss ``L*`` (the softmax runs' mean validation
loss at 25 %, 50 % and 100 % of training), the first step at which a run's validation loss is
≤ ``L*``, linearly interpolated between evaluations (``None`` if never reached).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import matplotlib.pyplot as plt
import numpy as np
import torch
from transformers.utils import logging as hf_logging

from circuits import variants as V
from circuits.checks import check_int
from circuits.measure import measure
from circuits.models import load_model
from circuits.output import exclusive, write_json
from circuits.plots import style
from circuits.probes import TokenBatch
from sinkscope.lab.corpus import load_corpus
from sinkscope.lab.train import EvalData, LabError, TrainConfig, read_log, throughput, train
from sinkscope.numbers import number

SCHEMA = "sinkscope.lab.compare/1"
VARIANT_STYLE = {
    "softmax": ("#1b1b1b", "o"),
    "sigmoid-nonorm": ("#d95f0e", "s"),
    "key-bias": ("#2c7fb8", "^"),
    "head-rmsnorm": ("#7a0177", "D"),
    "gated-attention": ("#41ab5d", "v"),
}
TARGET_FRACTIONS = (0.25, 0.5, 1.0)


@dataclass(frozen=True)
class CompareConfig:
    """Which runs make the comparison. ``base`` fixes everything but variant and seed."""

    base: TrainConfig = field(default_factory=TrainConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    seeded: tuple[str, ...] = ("softmax", "head-rmsnorm")  # run with every seed
    single: tuple[str, ...] = ("sigmoid-nonorm", "key-bias")  # first seed only (gated-attention: optional)
    jobs: int = 2
    bench_steps: int | None = None  # None: base.eval_every; 0: no throughput measurement
    bench_repeats: int = 2

    def validate(self) -> "CompareConfig":
        self.base.validate()
        if not self.seeds:
            raise LabError("at least one seed is needed")
        for v in (*self.seeded, *self.single):
            V.check_variant(v)
        if "softmax" not in self.seeded:
            raise LabError("the softmax baseline must be among the seeded variants")
        check_int(self.jobs, "jobs", error=LabError)
        for s in self.seeds:
            check_int(s, "seeds", minimum=0, error=LabError, rule="non-negative integers")
        if self.bench_steps is not None:  # None: base.eval_every
            check_int(self.bench_steps, "bench_steps", minimum=0, error=LabError, rule="0 (no throughput measurement) or a positive integer")
        check_int(self.bench_repeats, "bench_repeats", error=LabError)
        return self

    def runs(self) -> list[TrainConfig]:
        out = [dataclasses.replace(self.base, variant=v, seed=s) for v in self.seeded for s in self.seeds]
        out += [dataclasses.replace(self.base, variant=v, seed=self.seeds[0]) for v in self.single
                if v not in self.seeded]
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["base"] = self.base.to_dict()
        return d


def run_name(cfg: TrainConfig) -> str:
    return f"{cfg.variant}-s{cfg.seed}"


def _train_worker(cfg_dict: dict, out: str) -> str:
    hf_logging.disable_progress_bar()
    train(TrainConfig.from_dict(cfg_dict), out)
    return out


def train_all(out: Path, cmp: CompareConfig, progress: Callable[[str], None] = print) -> None:
    """Train every run of the comparison, ``jobs`` at a time (separate processes)."""
    runs = cmp.runs()
    todo = [c for c in runs if not (out / "runs" / run_name(c) / "final" / V.LAB_FILE).is_file()]
    progress(f"{len(runs)} runs, {len(runs) - len(todo)} already done; training {len(todo)} with {cmp.jobs} job(s)")
    if not todo:
        return
    t0 = time.perf_counter()
    if cmp.jobs == 1:
        for c in todo:
            _train_worker(c.to_dict(), str(out / "runs" / run_name(c)))
            progress(f"  done {run_name(c)} ({time.perf_counter() - t0:.0f} s)")
        return
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=cmp.jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_train_worker, c.to_dict(), str(out / "runs" / run_name(c))): c for c in todo}
        for fut in cf.as_completed(futures):
            fut.result()
            progress(f"  done {run_name(futures[fut])} ({time.perf_counter() - t0:.0f} s)")


# --------------------------------------------------------------------------- analysis


def steps_to_target(records: list[dict], target: float) -> float | None:
    """First (interpolated) step at which ``val_loss <= target``; None if never."""
    prev = None
    for r in records:
        if r["val_loss"] <= target:
            if prev is None or prev["val_loss"] == r["val_loss"]:
                return float(r["step"])
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - r["val_loss"])
            return float(prev["step"] + frac * (r["step"] - prev["step"]))
        prev = r
    return None


def _spread(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"n": 0, "reached": 0, "mean": None, "sd": None, "min": None, "max": None, "values": values}
    a = np.asarray(vals, dtype=float)
    return {"n": len(values), "reached": len(vals), "mean": float(a.mean()),
            "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "min": float(a.min()), "max": float(a.max()),
            "values": values}


def _curve_at(records: list[dict], step: float) -> float:
    steps = np.array([r["step"] for r in records], dtype=float)
    losses = np.array([r["val_loss"] for r in records], dtype=float)
    return float(np.interp(step, steps, losses))


def measure_final(run_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Load the final checkpoint with ``load_model`` and measure it with ``circuits.measure``
    on the run's own sink windows: alpha map, Sink_1^eps and (key-bias) the bias slot."""

    model = load_model(str(run_dir / "final"))
    corpus = load_corpus(cfg.corpus, model.tokenizer)
    tokens = EvalData(corpus, cfg, model.tokenizer.bos_token_id).sink_x
    lengths = torch.full((tokens.shape[0],), tokens.shape[1])
    str_tokens = [model.tokenizer.convert_ids_to_tokens(row.tolist()) for row in tokens]
    batch = TokenBatch(tokens, lengths, True, str_tokens)
    bias: list = []
    hooks = []
    if cfg.variant == "key-bias":
        def keep(pattern, hook):
            bias.append((hook.name, V.bias_slot_mass(pattern.detach(), None)))
        hooks = [(f"blocks.{l}.attn.hook_pattern", keep) for l in range(cfg.n_layers)]
    meas = measure(model, batch, hooks=hooks, batch_size=25, progress=False)
    alpha = meas.alpha_mean()  # [L, H, T]
    out = {"sink_rate_measure": float(meas.sink_rate(cfg.eps)[0]),
           "sink_rate_per_position": meas.sink_rate(cfg.eps)[:16].tolist(),
           "alpha_map": alpha[:, :, :16].tolist()}
    if bias:
        per_layer: dict[int, list] = {}
        for name, value in bias:
            per_layer.setdefault(int(name.split(".")[1]), []).append(value)
        b = np.stack([torch.cat(per_layer[l]).numpy() for l in sorted(per_layer)], 1)  # [N, L, H]
        out.update(bias_map=b.mean(0).tolist(), bias_sink_rate_measure=float(100 * (b > cfg.eps).mean()))
    return out


def analyze(out: Path, cmp: CompareConfig, *, measure_checkpoints: bool = True) -> dict[str, Any]:
    runs: dict[str, dict] = {}
    for c in cmp.runs():
        d = out / "runs" / run_name(c)
        records = read_log(d)
        if not records or records[-1]["step"] != c.steps:
            raise LabError(f"run {run_name(c)} is not complete; run the comparison again to finish it")
        run = {"variant": c.variant, "seed": c.seed, "records": records, "final": records[-1],
               "run": json.loads((d / "run.json").read_text())}
        if measure_checkpoints and c.seed == cmp.seeds[0]:
            run["measure"] = measure_final(d, c)
        runs[run_name(c)] = run

    steps = cmp.base.steps
    soft = [r for r in runs.values() if r["variant"] == "softmax"]
    targets = {f"{int(f * 100)}%": float(np.mean([_curve_at(r["records"], f * steps) for r in soft]))
               for f in TARGET_FRACTIONS}
    convergence: dict[str, Any] = {"targets": targets, "variants": {}}
    variants = list(dict.fromkeys(r["variant"] for r in runs.values()))
    for v in variants:
        vr = [r for r in runs.values() if r["variant"] == v]
        convergence["variants"][v] = {
            label: _spread([steps_to_target(r["records"], t) for r in vr]) for label, t in targets.items()
        }
    summary = {}
    for v in variants:
        vr = [r for r in runs.values() if r["variant"] == v]
        summary[v] = {
            "seeds": [r["seed"] for r in vr],
            "final_val_loss": _spread([r["final"]["val_loss"] for r in vr]),
            "final_sink_rate": _spread([r["final"]["sink_rate"] for r in vr]),
            "final_alpha0": _spread([r["final"]["alpha0"] for r in vr]),
            "max_sink_rate": _spread([max(x["sink_rate"] for x in r["records"]) for r in vr]),
        }
        if v == "key-bias":
            summary[v]["final_bias_mass"] = _spread([r["final"]["bias_mass"] for r in vr])
            summary[v]["final_bias_sink_rate"] = _spread([r["final"]["bias_sink_rate"] for r in vr])
        first = [r for r in vr if r["seed"] == cmp.seeds[0]]
        if first and "measure" in first[0]:
            summary[v]["sink_rate_measure_seed0"] = first[0]["measure"]["sink_rate_measure"]
            summary[v]["sink_rate_logged_seed0"] = first[0]["final"]["sink_rate"]
    onset = {}
    for name, r in runs.items():
        hit = [x["step"] for x in r["records"] if x["sink_rate"] >= 10.0]
        onset[name] = hit[0] if hit else None
    return {"schema": SCHEMA, "compare_config": cmp.to_dict(), "runs": runs, "summary": summary,
            "convergence": convergence, "sink_onset_step_10pct": onset}


# --------------------------------------------------------------------------- figures


def _by_variant(results: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in results["runs"].values():
        groups.setdefault(r["variant"], []).append(r)
    return groups


def _mean_band(ax, runs: list[dict], key: str, variant: str, label: str | None = None):
    steps = np.array([x["step"] for x in runs[0]["records"]])
    ys = np.array([[x[key] if x[key] is not None else np.nan for x in r["records"]] for r in runs], dtype=float)
    color, marker = VARIANT_STYLE.get(variant, ("#555555", "o"))
    n = len(runs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # train_loss is None at step 0
        ax.plot(steps, np.nanmean(ys, 0), color=color, marker=marker, markersize=3, lw=1.4,
                label=label or (f"{variant} (n={n})" if n > 1 else variant))
        if n > 1:
            ax.fill_between(steps, np.nanmin(ys, 0), np.nanmax(ys, 0), color=color, alpha=0.18, lw=0)


def plot_loss_curves(results: dict):

    with style():
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for v, runs in _by_variant(results).items():
            _mean_band(axes[0], runs, "val_loss", v)
            _mean_band(axes[1], runs, "train_loss", v)
        for ax, title in zip(axes, ("validation loss (held-out plays)", "training loss (mean since last log)")):
            ax.set_xlabel("step")
            ax.set_ylabel("cross-entropy (nats / byte)")
            ax.set_title(title)
            low, high = ax.get_ylim()
            if low < 3.2 < high:  # zoom past the first steps' spike; a short run that never gets below stays whole
                ax.set_ylim(top=3.2)
        axes[0].legend(fontsize=7)
        fig.suptitle("Loss curves: mean over seeds, band = min-max", fontsize=10)
    return fig


def plot_sink_rate(results: dict, eps: float):

    with style():
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        groups = _by_variant(results)
        for v, runs in groups.items():
            _mean_band(axes[0], runs, "sink_rate", v)
            _mean_band(axes[1], runs, "alpha0", v)
        if "key-bias" in groups:
            runs = groups["key-bias"]
            steps = [x["step"] for x in runs[0]["records"]]
            axes[0].plot(steps, np.mean([[x["bias_sink_rate"] for x in r["records"]] for r in runs], 0),
                         color=VARIANT_STYLE["key-bias"][0], ls="--", lw=1.2, label="key-bias: bias slot")
            axes[1].plot(steps, np.mean([[x["bias_mass"] for x in r["records"]] for r in runs], 0),
                         color=VARIANT_STYLE["key-bias"][0], ls="--", lw=1.2, label="key-bias: bias slot")
        axes[0].set_ylabel(f"Sink_1^{eps} (% of layer-heads)")
        axes[0].set_title(f"first-token sink rate (alpha_0 > {eps}), position 0")
        axes[1].set_ylabel("mean alpha of position 0")
        axes[1].set_title("attention received by the first token")
        for ax in axes:
            ax.set_xlabel("step")
        axes[0].legend(fontsize=7)
    return fig


def plot_alpha_maps(results: dict, eps: float, n_positions: int = 16):

    seed0 = [r for r in results["runs"].values() if "measure" in r]
    with style():
        fig, axes = plt.subplots(1, len(seed0), figsize=(2.9 * len(seed0) + 0.8, 3.8), squeeze=False)
        im = None
        for ax, r in zip(axes[0], seed0):
            m = r["measure"]
            alpha = np.asarray(m["alpha_map"], dtype=float)[:, :, :n_positions]
            L, H, T = alpha.shape
            grid = alpha.reshape(L * H, T)
            labels = [str(k) for k in range(T)]
            if "bias_map" in m:
                grid = np.concatenate([np.asarray(m["bias_map"]).reshape(L * H, 1), grid], axis=1)
                labels = ["bias"] + labels
            im = ax.imshow(grid, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, fontsize=6, rotation=90)
            ax.set_yticks(range(0, L * H, H))
            ax.set_yticklabels([f"L{l}" for l in range(L)], fontsize=7)
            ax.grid(False)
            ax.set_xlabel("key position")
            ax.set_title(f"{r['variant']}\nSink_1^{eps} = {m['sink_rate_measure']:.0f} %", fontsize=9)
        axes[0][0].set_ylabel("layer / head")
        fig.subplots_adjust(top=0.8, bottom=0.16)
        fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02, label="alpha (mean attention received)")
        fig.suptitle("Final alpha maps (seed 0, measured on the TransformerBridge with circuits.measure)",
                     fontsize=10, y=0.99)
    return fig


def plot_convergence(results: dict):

    groups = _by_variant(results)
    conv = results["convergence"]
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for v in ("softmax", "head-rmsnorm"):
            for r in groups.get(v, []):
                color, marker = VARIANT_STYLE[v]
                axes[0].plot([x["step"] for x in r["records"]], [x["val_loss"] for x in r["records"]],
                             color=color, lw=1, alpha=0.8, label=f"{v} s{r['seed']}")
        for _label, t in conv["targets"].items():
            axes[0].axhline(t, color="#9a9a9a", lw=0.8, ls=":")
        axes[0].set_ylim(top=min(2.6, axes[0].get_ylim()[1]))
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("validation loss")
        axes[0].set_title("softmax vs head-rmsnorm, every seed (dotted: targets)")
        axes[0].legend(fontsize=6, ncol=2)
        labels = list(conv["targets"])
        width = 0.8 / max(1, len(conv["variants"]))
        for i, (v, by_target) in enumerate(conv["variants"].items()):
            color, _ = VARIANT_STYLE.get(v, ("#555555", "o"))
            means = [by_target[l]["mean"] if by_target[l]["mean"] is not None else np.nan for l in labels]
            lo = [m - by_target[l]["min"] if by_target[l]["min"] is not None else 0 for m, l in zip(means, labels)]
            hi = [by_target[l]["max"] - m if by_target[l]["max"] is not None else 0 for m, l in zip(means, labels)]
            xs = np.arange(len(labels)) + (i - (len(conv["variants"]) - 1) / 2) * width
            axes[1].bar(xs, means, width, color=color, yerr=[lo, hi], capsize=2, label=v)
        axes[1].set_xticks(range(len(labels)))
        axes[1].set_xticklabels([f"softmax loss\nat {l} of steps" for l in labels], fontsize=7)
        axes[1].set_ylabel("steps to reach it (mean, min-max)")
        axes[1].set_title("steps to the baseline's loss")
        axes[1].legend(fontsize=6)
    return fig


# --------------------------------------------------------------------------- report


def _fmt(s: dict, digits: int = 3, unit: str = "") -> str:
    if s.get("mean") is None:
        return "not reached"
    def f(key: str) -> str:
        return number(s[key], digits, missing=None)

    if s["n"] == 1:
        return f"{f('mean')}{unit}"
    txt = f"{f('mean')}{unit} ± {f('sd')} (min {f('min')}, max {f('max')})"
    if s["reached"] < s["n"]:
        txt += f", reached by {s['reached']}/{s['n']}"
    return txt


def write_report(results: dict, folder: Path, *, command: str = "", figures_prefix: str = "") -> str:
    cmp = results["compare_config"]
    base = cmp["base"]
    eps = base["eps"]
    summ = results["summary"]
    conv = results["convergence"]
    first = next(iter(results["runs"].values()))
    corpus = first["run"]["corpus"]
    params = first["run"]["parameters"]
    lines = [
        "# Pre-training lab: attention variants at CPU scale",
        "",
        f"Measured {results.get('finished', '')}. Command: `{command or 'sinkscope lab-compare'}`"
        f" (wall {results.get('wall_seconds', 0) / 60:.1f} min on this machine's 2 shared CPU cores,"
        f" {cmp['jobs']} runs at a time, 1 thread each).",
        "",
        "## Setup",
        "",
        f"- Model: Llama-style decoder, {base['n_layers']} layers, d_model {base['d_model']}, {base['n_heads']} heads, "
        f"MLP {base['d_mlp']}, context {base['n_ctx']}, byte-level vocabulary (259); "
        f"{params['total']:,} parameters ({params['non_embedding']:,} without embeddings) for softmax.",
        f"- Corpus: {corpus['source']}; {corpus['train_tokens']:,} training bytes, "
        f"{corpus['val_tokens']:,} validation bytes (held-out plays: {', '.join(corpus['val_documents'][:4])}).",
        f"- Training: {base['steps']} steps × {base['batch_size']} windows × {base['n_ctx']} tokens "
        f"(<bos> + {base['n_ctx'] - 1} bytes) = {base['steps'] * base['batch_size'] * base['n_ctx']:,} tokens per run; "
        f"AdamW lr {base['lr']} (warmup {base['warmup_steps']}, cosine to {base['min_lr_ratio']}×), "
        f"weight decay {base['weight_decay']}, clip {base['grad_clip']}.",
        f"- Seeds {cmp['seeds']} for {', '.join(cmp['seeded'])}; seed {cmp['seeds'][0]} for {', '.join(cmp['single'])}.",
        f"- Logged every {base['eval_every']} steps: train loss, validation loss ({base['val_windows']} fixed windows), "
        f"Sink_1^{eps} = share of (layer, head) with alpha_0 > {eps} (Gu et al.; position 0 = <bos>), "
        f"on {base['sink_sequences']} fixed validation windows of {base['sink_tokens']} tokens, from the model's own "
        "attention weights.",
        "",
        "## Results",
        "",
        f"| variant | seeds | final val loss | final Sink_1^{eps} (%) | max Sink_1^{eps} over training (%) | final mean alpha_0 |",
        "|---|---|---|---|---|---|",
    ]
    for v, s in summ.items():
        lines.append(f"| {v} | {len(s['seeds'])} | {_fmt(s['final_val_loss'])} | {_fmt(s['final_sink_rate'], 1)} | "
                     f"{_fmt(s['max_sink_rate'], 1)} | {_fmt(s['final_alpha0'])} |")
    if "key-bias" in summ:
        kb = summ["key-bias"]
        lines += ["", f"Key-bias: mean attention mass on the bias slot {_fmt(kb['final_bias_mass'])}; "
                      f"share of layer-heads whose bias slot gets alpha > {eps}: {_fmt(kb['final_bias_sink_rate'], 1)} %."]
    lines += ["", "Sink_1^eps of the final seed-0 checkpoints, logged during training (HF attention weights) vs "
              "measured after `load_model` on the TransformerBridge (`circuits.measure`):", ""]
    lines += [f"- {v}: logged {s['sink_rate_logged_seed0']:.2f} %, bridge {s['sink_rate_measure_seed0']:.2f} %"
              for v, s in summ.items() if "sink_rate_measure_seed0" in s]
    onset = results["sink_onset_step_10pct"]
    lines += ["", "First logged step with Sink_1 ≥ 10 %: " + ", ".join(
        f"{k}: {v if v is not None else 'never'}" for k, v in onset.items()) + "."]
    lines += ["", "### Convergence: steps to reach the softmax baseline's validation loss", "",
              "| target (softmax mean val loss at) | loss | " + " | ".join(conv["variants"]) + " |",
              "|---|---|" + "---|" * len(conv["variants"])]
    for label, t in conv["targets"].items():
        cells = [_fmt(conv["variants"][v][label], 0) for v in conv["variants"]]
        lines.append(f"| {label} of steps | {t:.4f} | " + " | ".join(cells) + " |")
    if "head-rmsnorm" in conv["variants"]:
        lines += ["", "Speed-up of head-rmsnorm (softmax steps / head-rmsnorm steps, means): " + ", ".join(
            f"{label}: " + (f"{conv['variants']['softmax'][label]['mean'] / conv['variants']['head-rmsnorm'][label]['mean']:.2f}×"
                            if conv['variants']['head-rmsnorm'][label]['mean'] and conv['variants']['softmax'][label]['mean']
                            else "n/a")
            for label in conv["targets"]) + "."]
    bench = results.get("throughput")
    if bench:
        lines += ["", "## Throughput", "",
                  f"`sinkscope.lab.train.throughput` ({bench['variant']}, {bench['steps']} steps, {bench['repeats']} "
                  f"alternating repeats, {bench['threads']} thread, same process): plain PyTorch loop "
                  f"{bench['plain_tokens_per_s']:,.0f} tokens/s; lab trainer {bench['trainer_steady_tokens_per_s']:,.0f} "
                  f"tokens/s in its training steps (ratio **{bench['ratio_steady']:.2f}**), "
                  f"{bench['trainer_end_to_end_tokens_per_s']:,.0f} tokens/s end to end with its evaluation and "
                  f"checkpoint every {base['eval_every']} steps (ratio **{bench['ratio_end_to_end']:.2f}**)."]
    lines += ["", "## Figures", ""]
    for name, caption in (("loss_curves", "Loss curves"), ("sink_rate", "Sink_1^eps and alpha_0 over training"),
                          ("alpha_maps", "Final alpha maps"), ("convergence", "Convergence, softmax vs head-rmsnorm")):
        lines.append(f"![{caption}]({figures_prefix}{name}.png)")
        lines.append("")
    text = "\n".join(lines) + "\n"
    (folder / "report.md").write_text(text, encoding="utf-8")
    return text


def write_figures(results: dict, folder: Path) -> list[Path]:
    eps = results["compare_config"]["base"]["eps"]
    paths = []
    for name, fig in (("loss_curves", plot_loss_curves(results)), ("sink_rate", plot_sink_rate(results, eps)),
                      ("alpha_maps", plot_alpha_maps(results, eps)), ("convergence", plot_convergence(results))):
        path = folder / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def run_comparison(out: str | Path, cmp: CompareConfig, *, progress: Callable[[str], None] = print,
                   command: str = "") -> dict[str, Any]:
    """Train all runs (resumable), measure throughput, analyse, write report, figures, JSON."""
    cmp = cmp.validate()
    out = Path(out)
    with exclusive(out, "the comparison folder"):  # one comparison per folder at a time
        return _run_comparison(out, cmp, progress=progress, command=command)


def _run_comparison(out: Path, cmp: CompareConfig, *, progress: Callable[[str], None], command: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    train_all(out, cmp, progress)
    bench = None
    if cmp.bench_steps != 0:
        progress("measuring throughput (trainer vs plain PyTorch loop, same process)")
        bench = throughput(dataclasses.replace(cmp.base, variant="softmax", seed=cmp.seeds[0]),
                           steps=cmp.bench_steps, repeats=cmp.bench_repeats)
    progress("analysing: loading final checkpoints with load_model and measuring them")
    results = analyze(out, cmp)
    results["throughput"] = bench
    results["wall_seconds"] = time.perf_counter() - t0
    results["finished"] = time.strftime("%Y-%m-%d %H:%M")
    write_figures(results, out)
    write_report(results, out, command=command)
    write_json(out / "results.json", results)
    return results


def load_results(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "results.json").read_text(encoding="utf-8"))
