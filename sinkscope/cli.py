"""The ``sinkscope`` command: a thin layer that parses, calls one library function, writes.

Every subcommand is a pair: ``_add_<name>(subparsers)`` declares its arguments and
``_run_<name>(args)`` does the work. Bad input (an unknown model, an empty text, a broken file,
a bad intervention spec, ...) becomes one line on stderr and exit code 2, never a traceback;
outputs go through :func:`circuits.output.atomic_output_dir`, so a failed run leaves nothing
half-written.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from circuits.errors import SinkscopeError

EXIT_BAD_INPUT = 2


class CLIError(SinkscopeError):
    """A problem with what the user asked for; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise CLIError(message)


def _texts(args) -> list[str]:
    # deferred: the command starts without torch; a job imports what it runs
    from circuits.probes import check_texts, read_prompts_file

    texts = read_prompts_file(args.prompts) if args.prompts is not None else list(args.text)
    return check_texts(texts, args.max_tokens)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="a name from `sinkscope models`, a local HF folder or an HF id")
    p.add_argument("--dtype", default="float32", metavar="{float32,bfloat16,float16}",
                   help="weights' precision (statistics are reduced in float32 whatever it is)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N or mps")


def _load(args):
    """The model the arguments name, placed as they say (bad dtype or device: one line, exit 2)."""
    # deferred: the command starts without torch; a job imports what it runs
    from circuits.models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


def _add_input_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", metavar="STR", help="one or more texts")
    src.add_argument("--prompts", metavar="FILE", help="a file of prompts (blank-line separated, or a JSON list)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="truncate each sequence to N tokens")
    p.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="prepend the BOS token (default: what the model's own tokenizer does)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B")


# --------------------------------------------------------------------------- models


def _add_models(sub) -> None:
    sub.add_parser("models", help="list model names and whether each is ready offline")


def _run_models(args) -> int:
    # deferred: the command starts without torch; a job imports what it runs
    from circuits.models import list_models

    rows = list_models()
    width = max(len(row.name) for row in rows)
    for row in rows:
        state = "ready offline" if row.ready_offline else f"NOT INSTALLED: {row.problem}"
        cache = " (cached)" if row.cached else ""
        print(f"{row.name:{width}s}  {state}{cache}  {row.description}")
    print("also: any Hugging Face model id TransformerLens supports (needs the hub), or a local HF folder")
    return 0


# --------------------------------------------------------------------------- measure


def _add_measure(sub) -> None:
    p = sub.add_parser("measure", help="measure attention sinks; writes sinks.json and figures")
    _add_model_args(p)
    _add_input_args(p)
    p.add_argument("--eps", type=float, default=0.3, help="threshold of Sink_k^eps (default 0.3)")
    p.add_argument("--out", required=True, type=Path)


def _run_measure(args) -> int:
    # deferred: the command starts without torch; a job imports what it runs
    from circuits.measure import measure
    from circuits.output import atomic_output_dir
    from circuits.probes import tokenize
    from sinkscope.jobs import write_measure_outputs

    if not 0 < args.eps < 1:
        raise CLIError(f"--eps must be between 0 and 1, got {args.eps}")
    texts = _texts(args)
    model = _load(args)
    batch = tokenize(model, texts, prepend_bos=args.prepend_bos, max_tokens=args.max_tokens)
    meas = measure(model, batch, batch_size=args.batch_size, metadata={"max_tokens": args.max_tokens})
    with atomic_output_dir(args.out) as folder:
        doc = write_measure_outputs(meas, folder, eps=args.eps)
    fr = doc["sink_rate"]["first_token"]
    print(f"{meas.model}: Sink_1^{args.eps} = {fr['value']:.1f} % over {meas.n_sequences} sequences; "
          f"{len(doc['secondary'])} secondary-sink candidates; wrote {args.out}/sinks.json")
    return 0


# --------------------------------------------------------------------------- demo


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: measure smollm2-135m on the built-in probes, write a report")
    _add_model_args(p)
    p.add_argument("--n", type=int, default=100, help="number of probe passages (default 100)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--out", type=Path, default=Path("sinkscope-out"))


def _run_demo(args) -> int:
    # deferred: the command starts without torch; a job imports what it runs
    from circuits.output import atomic_output_dir
    from sinkscope.jobs import run_demo

    if args.n <= 0:
        raise CLIError(f"--n must be positive, got {args.n}")
    model = _load(args)
    with atomic_output_dir(args.out) as folder:
        doc = run_demo(model, folder, n=args.n, max_tokens=args.max_tokens, eps=args.eps, prepend_bos=args.prepend_bos)
    fr = doc["sink_rate"]["first_token"]
    print(f"{doc['model']}: Sink_1^{args.eps} = {fr['value']:.1f} %; report: {args.out}/report.md")
    return 0


# --------------------------------------------------------------------------- pre-training lab


def _add_pretrain(sub) -> None:
    # deferred: the command starts without torch; a job imports what it runs
    from sinkscope.lab.cli import add_pretrain

    add_pretrain(sub)


def _run_pretrain(args) -> int:
    # deferred: the command starts without torch; a job imports what it runs
    from sinkscope.lab.cli import run_pretrain

    return run_pretrain(args)


def _add_lab_compare(sub) -> None:
    # deferred: the command starts without torch; a job imports what it runs
    from sinkscope.lab.cli import add_lab_compare

    add_lab_compare(sub)


def _run_lab_compare(args) -> int:
    # deferred: the command starts without torch; a job imports what it runs
    from sinkscope.lab.cli import run_lab_compare

    return run_lab_compare(args)


# --------------------------------------------------------------------------- reproduce


def _add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="run every paper analysis (Wong, Li, Gu et al.) on a model; writes report.md")
    _add_model_args(p)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--size", choices=("full", "ci"), default="full",
                   help="full: 1,024-token traces, about 15 min per model on 2 cores; ci: a small smoke-test setting")
    p.add_argument("--checkpoints", type=Path, default=None, metavar="DIR",
                   help="also compare Sink_1^eps of every HF checkpoint folder under DIR (default $SINKSCOPE_CHECKPOINTS)")


def _run_reproduce(args) -> int:
    # deferred: the command starts without torch; a job imports what it runs
    from circuits.output import atomic_output_dir
    from sinkscope.reproduce import reproduce

    with atomic_output_dir(args.out) as folder:  # the model is loaded inside, so its load time is reported
        doc = reproduce(args.model, folder, size=args.size, checkpoints=args.checkpoints)
    counts = {v: sum(c["verdict"] == v for c in doc["claims"]) for v in ("holds", "partly holds", "does not hold")}
    print(f"{doc['model']}: {len(doc['claims'])} claims: " + ", ".join(f"{n} {v}" for v, n in counts.items())
          + f"; {doc['timings_s']['total'] / 60:.1f} min, peak {doc['peak_memory_mb'] / 1024:.2f} GB; report: {args.out}/report.md")
    return 0


# --------------------------------------------------------------------------- intervene


def _add_intervene(sub) -> None:
    p = sub.add_parser(
        "intervene",
        help="measure an intervention's effect on the sinks (clean vs intervened); writes effect.json and figures",
    )
    _add_model_args(p)
    p.add_argument("--intervention", required=True, metavar="SPEC",
                   help="an intervention spec, e.g. 'ablate-mlp:layer=3,positions=5' or 'amplify-variance:layer=2,positions=7,factor=4'")
    p.add_argument("--control", choices=["random", "position", "layer", "direction"], default=None,
                   help="add an equal-budget random control (seeded): 'random' moves the intervention to a random non-sink "
                        "position, another layer or a random direction, whichever it allows; the others force one")
    _add_input_args(p)
    p.add_argument("--strengths", nargs="+", type=float, metavar="S",
                   help="also sweep the intervention's strength over these values and draw a dose-response curve")
    p.add_argument("--eps", type=float, default=0.3, help="threshold of Sink_k^eps (default 0.3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the random control")
    p.add_argument("--n-resamples", type=int, default=2000, metavar="N", help="bootstrap resamples (default 2000; 0 turns the CIs off)")
    p.add_argument("--out", required=True, type=Path)


def _run_intervene(args) -> int:
    # deferred: the command starts without torch; a job imports what it runs
    # deferred: the command starts without torch; a job imports what it runs
    from circuits import plots
    from circuits.output import atomic_output_dir, write_json
    from circuits.probes import tokenize
    from interventions.effect import measure_effect
    from interventions.registry import parse_spec
    from interventions.sweep import sweep

    if not 0 < args.eps < 1:
        raise CLIError(f"--eps must be between 0 and 1, got {args.eps}")
    if args.n_resamples < 0:
        raise CLIError(f"--n-resamples must be 0 (no CIs) or positive, got {args.n_resamples}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be positive, got {args.batch_size}")
    strengths = list(args.strengths or [])
    bad = [s for s in strengths if not math.isfinite(s)]
    if bad:
        raise CLIError(f"--strengths must be finite numbers, got {bad[0]}")
    texts = _texts(args)
    intervention = parse_spec(args.intervention)
    for s in strengths:  # every variant is checked before the model is loaded
        intervention.with_strength(s)
    model = _load(args)
    batch = tokenize(model, texts, prepend_bos=args.prepend_bos, max_tokens=args.max_tokens)
    settings = dict(eps=args.eps, batch_size=args.batch_size, n_resamples=args.n_resamples, seed=args.seed)
    effect = measure_effect(model, batch, intervention, control=args.control, progress=True,
                            metadata={"max_tokens": args.max_tokens}, **settings)
    with atomic_output_dir(args.out) as folder:
        doc = effect.to_json()
        tokens = effect.clean.tokens[0] if effect.clean.n_sequences == 1 else None
        title = f"{effect.clean.model}: {effect.spec}: change of the sink score (n={effect.clean.n_sequences})"
        plots.save(plots.sink_delta_heatmap(effect.frame, tokens=tokens, target_positions=effect.target.positions,
                                            title=title), folder / "sink_delta_heatmap.png")
        if strengths:
            result = sweep(model, batch, intervention, {"strength": strengths}, folder / "sweep", format="csv",
                           progress=True, **settings)
            plots.save(plots.dose_response(result.frame, title=f"{effect.clean.model}: dose-response of {effect.spec}"),
                       folder / "dose_response.png")
            curve = result.frame[result.frame["metric"].isin(["target_sink_score", "next_token_loss", "kl"])]
            keep = ["iv_strength", "spec", "metric", "n", "clean", "intervened", "delta", "ci_low", "ci_high"]
            doc["dose_response"] = curve[keep].astype(object).where(curve[keep].notna(), None).to_dict(orient="records")
        write_json(folder / "effect.json", doc)
    t = effect.summary["target_sink_score"]
    kl = effect.summary["kl"]["delta"]
    print(f"{effect.clean.model}: {effect.spec}: target sink score {t['clean']:.4f} -> {t['intervened']:.4f} "
          f"(delta {t['delta']:+.4f}, 95% CI {t['ci95'][0]:+.4f}..{t['ci95'][1]:+.4f}); KL {kl:.4g} nats/token; "
          f"wrote {args.out}/effect.json")
    return 0


COMMANDS = {
    "models": (_add_models, _run_models),
    "measure": (_add_measure, _run_measure),
    "demo": (_add_demo, _run_demo),
    "intervene": (_add_intervene, _run_intervene),
    "pretrain": (_add_pretrain, _run_pretrain),
    "lab-compare": (_add_lab_compare, _run_lab_compare),
    "reproduce": (_add_reproduce, _run_reproduce),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sinkscope", description="Causal, mechanistic study of attention sinks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command][1](args)
    except SinkscopeError as exc:
        print(f"sinkscope: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("sinkscope: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
