"""Benchmark: ablate each of smollm2-135m's 30 MLPs in turn, recording every layer's sink score.

One command, four ways of doing the same work, all in this process (so machine load affects
them alike), reported as ratios:

  (a) sinkscope's sweep (prefix reuse, statistics reduced in hooks, no unembedding needed,
      no bootstrap CIs: like (b)-(d) it records the sink scores, nothing more);
  (b) a naive TransformerLens loop: ``run_with_cache`` of every attention pattern, once per
      intervention (plus the clean run), sink scores computed from the cache;
  (c) the same with nnsight on the plain HF model (eager attention, so weights are returned),
      sink scores reduced inside the trace;
  (d) 31 plain transformers forward passes of the same batch (default attention
      implementation), recording nothing: the cost floor of "one forward per intervention".

Work: 16 sequences × 128 tokens (built-in probe passages), zero-ablation of ``hook_mlp_out`` at
layer l for l = 0..29, all positions; the sink score of every (layer, position).
Peak RSS of (a) is read (``ru_maxrss``) right after (a), which runs first.

    python bench/mlp_ablation_sweep.py [--n 16] [--tokens 128] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuits.measure import attention_received  # noqa: E402
from circuits.models import cache_root, load_model  # noqa: E402
from circuits.probes import probe_texts, tokenize  # noqa: E402
from interventions.sweep import sweep  # noqa: E402


def texts(n: int) -> list[str]:
    passages = probe_texts()
    return [passages[2 * i] + " " + passages[2 * i + 1] for i in range(n)]  # two passages: > 128 tokens


def run_a(model, batch, n_layers: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = sweep(model, batch, "ablate-mlp:layer={layer}", {"layer": list(range(n_layers))}, out,
                       side_effects=False, positions=None, n_resamples=0, batch_size=16, progress=False)
        seconds = time.perf_counter() - start
    rows = result.frame.query("metric == 'sink_score'")
    assert rows["layer"].nunique() == n_layers and rows["item"].nunique() == n_layers
    return seconds


def run_b(model, batch, n_layers: int) -> float:
    lengths = batch.lengths
    zero = lambda act, hook: torch.zeros_like(act)  # noqa: E731
    start = time.perf_counter()
    with torch.no_grad():
        for ablate in [None, *range(n_layers)]:
            hooks = [] if ablate is None else [(f"blocks.{ablate}.hook_mlp_out", zero)]
            with model.hooks(fwd_hooks=hooks):
                _, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n.endswith("attn.hook_pattern"))
            scores = [attention_received(cache[f"blocks.{l}.attn.hook_pattern"], lengths)[1] for l in range(n_layers)]
            assert len(scores) == n_layers
            del cache
    return time.perf_counter() - start


def load_hf(attn: str | None):
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_pretrained(cache_root() / "smollm2-135m", dtype=torch.float32, **kwargs).eval()


def run_c(batch, n_layers: int) -> float:
    import nnsight
    from nnsight import LanguageModel
    from transformers import AutoTokenizer

    hf = load_hf("eager")
    lm = LanguageModel(hf, tokenizer=AutoTokenizer.from_pretrained(cache_root() / "smollm2-135m"))
    lengths = batch.lengths
    start = time.perf_counter()
    with torch.no_grad():
        for ablate in [None, *range(n_layers)]:
            with lm.trace(batch.tokens):
                scores = nnsight.save([])
                for layer in range(n_layers):
                    pattern = lm.model.layers[layer].self_attn.output[1]
                    scores.append(attention_received(pattern, lengths)[1])
                    if layer == ablate:
                        lm.model.layers[layer].mlp.output[:] = 0
            assert len(scores) == n_layers
    return time.perf_counter() - start


def run_d(batch, n_layers: int) -> float:
    hf = load_hf(None)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(n_layers + 1):
            hf(batch.tokens)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip", default="", help="comma-separated methods to skip, e.g. b,c")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("smollm2-135m")
    batch = tokenize(model, texts(args.n), prepend_bos=False, max_tokens=args.tokens)
    assert int(batch.lengths.min()) == args.tokens
    n_layers = int(model.cfg.n_layers)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    seconds = {"a": run_a(model, batch, n_layers)}
    peak_a = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    skip = set(args.skip.split(",")) if args.skip else set()
    if "b" not in skip:
        seconds["b"] = run_b(model, batch, n_layers)
    del model
    if "c" not in skip:
        seconds["c"] = run_c(batch, n_layers)
    seconds["d"] = run_d(batch, n_layers)
    result = {
        "work": f"zero-ablate each of {n_layers} MLPs; {args.n} x {args.tokens} tokens; sink score of every layer",
        "threads": args.threads,
        "seconds": seconds,
        "a_over_d": seconds["a"] / seconds["d"],
        "b_over_a": seconds.get("b", float("nan")) / seconds["a"],
        "c_over_a": seconds.get("c", float("nan")) / seconds["a"],
        "peak_rss_gb_after_a": peak_a,
        "rss_gb_before_a": rss_before,
        "versions": {"torch": torch.__version__},
    }
    print(json.dumps(result, indent=1), flush=True)
    print(f"(a) sweep {seconds['a']:.1f} s | (b) TL run_with_cache {seconds.get('b', float('nan')):.1f} s | "
          f"(c) nnsight {seconds.get('c', float('nan')):.1f} s | (d) 31 HF forwards {seconds['d']:.1f} s")
    print(f"(a)/(d) = {result['a_over_d']:.2f} (target <= 0.6); (b)/(a) = {result['b_over_a']:.1f}x (target >= 3); "
          f"(c)/(a) = {result['c_over_a']:.1f}x (target >= 2); peak RSS after (a) = {peak_a:.2f} GB (target <= 2.5)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
