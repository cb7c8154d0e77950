"""Benchmark (issue 12): measuring one long sequence, eager T x T path against the fused path.

One command. Each configuration (model, tokens, path) runs in its own subprocess, so its peak
RSS (``ru_maxrss``, read right after the measurement) is its own; in the same subprocess, after
the measurement, one plain transformers forward of the same tokens (``attn_implementation=
"sdpa"``, full logits) is timed, and the measurement's time is reported as a ratio to it.

* ``measure``: :func:`circuits.measure.measure` on one sequence (``fused=False`` for the old
  path: eager pattern in every layer and full logits, as before issue 12);
* ``cli`` (``--cli``): the whole ``sinkscope measure`` command (model load, measurement,
  sinks.json, figures, view.html) in a subprocess of the child, for the 8k target;
* an old-path configuration whose estimated memory (:func:`circuits.memory.estimate_measure_bytes`)
  exceeds 60 % of the free memory is not run; the table says so.

Tokens: the built-in reasoning traces (:func:`circuits.probes.reasoning_texts`) joined and cut
to exactly T tokens, no BOS prepended unless the model's tokenizer adds one.

    python bench/long_context.py                      # smollm2-135m, 1k/2k/4k/8k, old and new
    python bench/long_context.py --long               # + gemma3-270m and qwen2.5-coder-0.5b at 32,768 (slow)
    python bench/long_context.py --lengths --long --baseline-max-tokens 16384   # only the 32k runs, no baseline
    python bench/long_context.py --lengths 1024 --paths new --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def long_text(model, n_tokens: int):
    from circuits.probes import reasoning_texts, tokenize

    text = "\n\n".join(reasoning_texts())
    while True:
        batch = tokenize(model, [text], max_tokens=n_tokens)
        if int(batch.lengths[0]) >= n_tokens:
            return batch
        text = text + "\n\n" + text


def child(model_name: str, n_tokens: int, path: str, cli: bool, threads: int, baseline_max: int) -> dict:
    """One configuration, in this (child) process: measure, then one SDPA forward."""
    import torch

    torch.set_num_threads(threads)
    from circuits.measure import measure
    from circuits.memory import estimate_measure_bytes
    from circuits.models import cache_root, load_model

    out: dict = {"model": model_name, "tokens": n_tokens, "path": path, "threads": threads}
    model = load_model(model_name)
    batch = long_text(model, n_tokens)
    fused = path == "new"
    out["estimate_bytes"] = estimate_measure_bytes(model, n_tokens, fused=fused, full_logits=not fused).total
    out["rss_after_load"] = _peak_rss()
    start = time.perf_counter()
    meas = measure(model, batch, batch_size=1, progress=False, fused=fused, full_logits=not fused)
    out["measure_s"] = time.perf_counter() - start
    out["peak_rss"] = _peak_rss()
    out["alpha_first_mean"] = float(meas.alpha[0, :, :, 0].mean())
    del meas
    if cli:
        with tempfile.TemporaryDirectory() as tmp:
            prompt = Path(tmp) / "trace.json"
            prompt.write_text(json.dumps([model.to_string(batch.tokens[0])]))
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "sinkscope.cli", "measure", "--model", model_name, "--prompts",
                                   str(prompt), "--max-tokens", str(n_tokens), "--out", str(Path(tmp) / "out")],
                                  capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            out["cli_s"] = time.perf_counter() - start
            out["cli_rc"] = done.returncode
            out["cli_peak_rss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
            out["cli_stdout"] = done.stdout.strip()[-300:] + done.stderr.strip()[-300:]
    del model
    from transformers import AutoModelForCausalLM

    if n_tokens > baseline_max:
        return out
    hf = AutoModelForCausalLM.from_pretrained(cache_root() / model_name, attn_implementation="sdpa", dtype=torch.float32).eval()
    ids = batch.tokens[:1]
    # full logits where they fit (2 GB); else only the last position's (Gemma 3 at 32k: 34 GB of logits)
    keep = 0 if n_tokens * int(hf.config.vocab_size) * 4 <= 2e9 else 1
    out["sdpa_logits"] = "all" if keep == 0 else "last position only"
    with torch.no_grad():
        start = time.perf_counter()
        hf(ids, logits_to_keep=keep)
        out["sdpa_s"] = time.perf_counter() - start
    out["ratio"] = out["measure_s"] / out["sdpa_s"]
    if cli:
        out["cli_ratio"] = out["cli_s"] / out["sdpa_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192], help="smollm2 lengths (none: --lengths)")
    p.add_argument("--paths", nargs="+", default=["old", "new"], choices=["old", "new"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--long", nargs="*", default=None, metavar="MODEL",
                   help="also these models (default: gemma3-270m qwen2.5-coder-0.5b) at 32,768 tokens, new path")
    p.add_argument("--cli", action="store_true", help="time the whole `sinkscope measure` at the longest length (new path)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--baseline-max-tokens", type=int, default=1 << 30,
                   help="skip the SDPA baseline above this many tokens (the 32k runs only need to complete)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", nargs=3, metavar=("MODEL", "TOKENS", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--child-cli", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), args.child[2], args.child_cli, args.threads,
                                           args.baseline_max_tokens)))
        return

    from circuits.memory import available_bytes, estimate_measure_bytes, gb
    from circuits.models import load_model

    configs = [(args.model, t, path) for t in args.lengths for path in args.paths]
    if args.long is not None:
        configs += [(name, 32768, "new") for name in args.long or ["gemma3-270m", "qwen2.5-coder-0.5b"]]
    with open("/proc/loadavg") as f:
        print(f"load average before: {f.read().split()[:3]}", flush=True)
    rows = []
    models: dict = {}
    for name, t, path in configs:
        if path == "old":
            model = models.setdefault(name, load_model(name))
            need = estimate_measure_bytes(model, t, fused=False, full_logits=True).total
            free = available_bytes() or 0
            if need > 0.6 * free:
                row = {"model": name, "tokens": t, "path": path, "skipped": f"estimate {gb(need)} > 60 % of {gb(free)} free"}
                print(json.dumps(row), flush=True)
                rows.append(row)
                continue
        cmd = [sys.executable, __file__, "--child", name, str(t), path, "--threads", str(args.threads),
               "--baseline-max-tokens", str(args.baseline_max_tokens)]
        if args.cli and path == "new" and name == args.model and args.lengths and t == max(args.lengths):
            cmd.append("--child-cli")
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        row = json.loads(line[0][7:]) if line else {"model": name, "tokens": t, "path": path, "failed": done.stderr.strip()[-500:]}
        with open("/proc/loadavg") as f:
            row["load_after"] = f.read().split()[:3]
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| model | tokens | path | measure s | SDPA forward s | ratio | peak RSS | estimate |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "measure_s" in r and "sdpa_s" not in r:
            print(f"| {r['model']} | {r['tokens']} | {r['path']} | {r['measure_s']:.1f} | not run | | "
                  f"{r['peak_rss'] / 1e9:.2f} GB | {r['estimate_bytes'] / 1e9:.2f} GB |")
        elif "measure_s" in r:
            print(f"| {r['model']} | {r['tokens']} | {r['path']} | {r['measure_s']:.1f} | {r['sdpa_s']:.1f} | "
                  f"{r['ratio']:.2f} | {r['peak_rss'] / 1e9:.2f} GB | {r['estimate_bytes'] / 1e9:.2f} GB |")
        else:
            print(f"| {r['model']} | {r['tokens']} | {r['path']} | {r.get('skipped') or 'failed'} | | | | |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
