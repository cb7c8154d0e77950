"""GPU check: sinkscope's main paths on CUDA, with speed and memory against a plain forward.

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
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(PACKAGED))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--long-tokens", type=int, default=8192)
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only to dry-run this script")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible here (torch.cuda.is_available() is False); nothing to check")
        return 0
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
