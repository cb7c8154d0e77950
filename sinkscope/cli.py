"""The ``sinkscope`` command: a thin layer that parses, calls one library function, writes.

Every subcommand is a pair: ``_add_<name>(subparsers)`` declares its arguments and
``_run_<name>(args)`` does the work. Bad input (an unknown model, an empty text, a broken file,
a bad intervention spec, an ``--out`` that cannot be written, ...) becomes one line on stderr and
exit code 2, never a traceback, and is found before any work where it can be; outputs go through
:func:`circuits.output.atomic_output_dir`, so a failed or interrupted run (Ctrl-C or SIGTERM)
leaves nothing half-written and never mixes two runs' files.

Building the parser imports neither torch nor transformers (``sinkscope --help`` and argument
errors answer at once; ``tests/test_cli_inputs.py`` checks ``sys.modules``): every heavy import is
deferred into the ``_run_<name>`` that needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from circuits.checks import check_eps, check_float, check_int
from circuits.errors import SinkscopeError
from sinkscope.lab.cli import add_lab_compare, add_pretrain, run_lab_compare, run_pretrain

EXIT_BAD_INPUT = 2


class CLIError(SinkscopeError):
    """A problem with what the user asked for; printed as one line, exit code 2."""


class Interrupted(KeyboardInterrupt):
    """An interruption after which something was kept on purpose; the message says what."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise CLIError(message)


def _texts(args) -> list[str]:
    """The texts the arguments name, checked; a prompts file's count and format are printed."""
    # deferred: the command starts without torch; a job imports what it runs
    from circuits.probes import check_texts, read_prompts

    if args.prompts is None:
        texts = list(args.text)
    else:
        texts, fmt = read_prompts(args.prompts, args.prompts_format)
        print(f"read {len(texts)} prompt{'s' if len(texts) != 1 else ''} from {args.prompts} ({fmt})", flush=True)
    return check_texts(texts, args.max_tokens)


def _check_eps(eps: float) -> None:
    """The library's rule for eps (:func:`circuits.checks.check_eps`), named by its option."""
    check_eps(eps, "--eps", error=CLIError)


def _check_positive(flag: str, value: int) -> None:
    check_int(value, flag, error=CLIError)


def _check_out(args) -> None:
    """``--out`` is checked before any work (again when the result is swapped in)."""
    # deferred: the command starts without torch; a job imports what it runs
    from circuits.output import check_output_dir

    check_output_dir(args.out)


def _check_context(model, max_tokens: int | None) -> None:
    n_ctx = int(model.cfg.n_ctx)
    if max_tokens is not None and max_tokens > n_ctx:
        raise CLIError(f"--max-tokens must be <= {n_ctx} (the context of {model.cfg.model_name}), got {max_tokens}")


def _check_batch_fits(model, batch, batch_size: int) -> None:
    """An input whose forward would not fit in free memory is refused before the forward, with
    the estimate (:func:`circuits.memory.check_fits`); one beyond the context never gets here
    (:func:`circuits.probes.tokenize` refuses it)."""
    # deferred: the command starts without torch; a job imports what it runs
    from circuits.memory import check_fits

    check_fits(model, int(batch.tokens.shape[1]), min(batch_size, len(batch)))


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
    src.add_argument("--prompts", metavar="FILE",
                     help="a file of prompts: blank-line separated paragraphs, one per line, a JSON list or JSONL")
    p.add_argument("--prompts-format", choices=("paragraphs", "lines", "json", "jsonl"), default=None,
                   help="how to read --prompts (default: from the extension and content where unambiguous)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="truncate each sequence to N tokens (2 up to the model's context)")
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
    p = sub.add_parser("measure", help="measure attention sinks; writes sinks.json, figures and view.html")
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

    _check_eps(args.eps)
    _check_positive("--batch-size", args.batch_size)
    _check_out(args)
    texts = _texts(args)
    model = _load(args)
    _check_context(model, args.max_tokens)
    batch = tokenize(model, texts, prepend_bos=args.prepend_bos, max_tokens=args.max_tokens)
    _check_batch_fits(model, batch, args.batch_size)
    meas = measure(model, batch, batch_size=args.batch_size, metadata={"max_tokens": args.max_tokens})
    with atomic_output_dir(args.out) as folder:
        doc = write_measure_outputs(meas, folder, eps=args.eps)
    print(f"{meas.model}: Sink_1^{args.eps} = {_with_ci(doc['sink_rate']['first_token'])} over {meas.n_sequences} "
          f"sequence{'s' if meas.n_sequences != 1 else ''}; {len(doc['secondary'])} secondary-sink candidates; "
          f"wrote {args.out}/sinks.json")
    return 0


def _with_ci(first_token: dict) -> str:
    """``70.9 % (95 % CI 69.2-72.4 %)``, or the reason there is no CI (one sequence)."""
    ci = first_token.get("ci95")
    if ci is None or None in ci:
        return f"{first_token['value']:.1f} % (no CI: {first_token.get('ci95_note', 'not computed')})"
    return f"{first_token['value']:.1f} % (95 % CI {ci[0]:.1f}-{ci[1]:.1f} %)"


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
    from circuits.probes import check_texts
    from sinkscope.jobs import run_demo

    _check_positive("--n", args.n)
    _check_eps(args.eps)
    check_texts(["demo"], args.max_tokens)
    _check_out(args)
    model = _load(args)
    _check_context(model, args.max_tokens)
    with atomic_output_dir(args.out) as folder:
        doc = run_demo(model, folder, n=args.n, max_tokens=args.max_tokens, eps=args.eps, prepend_bos=args.prepend_bos)
    print(f"{doc['model']}: Sink_1^{args.eps} = {_with_ci(doc['sink_rate']['first_token'])}; report: {args.out}/report.md")
    return 0


# --------------------------------------------------------------------------- reproduce


def _add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="run every paper analysis (Wong, Li, Gu et al.) on a model; writes report.md")
    _add_model_args(p)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--size", choices=("full", "ci", "long"), default="full",
                   help="full: every paper on 1,024-token traces, 10-30 min per model on 2 cores; ci: a small smoke-test setting; "
                        "long: Wong et al. alone on the longest of the model's own sessions, 8,192 tokens")
    p.add_argument("--compare", type=Path, default=None, metavar="NUMBERS_JSON",
                   help="the numbers.json of another run of the same model (e.g. the full-size report beside a long run): "
                        "the report then says what changes between the two lengths")
    p.add_argument("--checkpoints", type=Path, default=None, metavar="DIR",
                   help="also compare Sink_1^eps of every HF checkpoint folder under DIR (default $SINKSCOPE_CHECKPOINTS)")


def _run_reproduce(args) -> int:
    # deferred: the command starts without torch; a job imports what it runs
    from circuits.models import resolve_placement
    from circuits.output import atomic_output_dir
    from sinkscope.reproduce import reproduce
    from sinkscope.reproduce.report import read_compare

    if args.checkpoints is not None and not args.checkpoints.is_dir():
        raise CLIError(f"--checkpoints {args.checkpoints}: no such folder")
    if args.compare is not None and not args.compare.is_file():
        raise CLIError(f"--compare {args.compare}: no such file")
    read_compare(args.compare)  # a file without what the comparison reads fails here, before any work
    resolve_placement(args.dtype, args.device)  # a bad dtype or device fails here, before any work
    _check_out(args)
    with atomic_output_dir(args.out) as folder:  # the model is loaded inside, so its load time is reported
        doc = reproduce(args.model, folder, size=args.size, checkpoints=args.checkpoints, dtype=args.dtype, device=args.device,
                        compare=args.compare)
    counts = {v: sum(c["verdict"] == v for c in doc["claims"]) for v in ("holds", "partly holds", "does not hold")}
    print(f"{doc['model']}: {len(doc['claims'])} claims: " + ", ".join(f"{n} {v}" for v, n in counts.items())
          + f"; {doc['timings_s']['total'] / 60:.1f} min, peak {doc['peak_memory_mb'] / 1024:.2f} GB; report: {args.out}/report.md")
    return 0


# --------------------------------------------------------------------------- intervene


def _add_intervene(sub) -> None:
    p = sub.add_parser(
        "intervene",
        help="measure an intervention's effect on the sinks (clean vs intervened); writes effect.json, figures and view.html",
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
    from circuits.output import exclusive
    from circuits.probes import tokenize
    from interventions.effect import measure_effect
    from interventions.registry import parse_spec

    _check_eps(args.eps)
    check_int(args.n_resamples, "--n-resamples", minimum=0, error=CLIError, rule="0 (no CIs) or a positive integer")
    check_int(args.seed, "--seed", minimum=0, error=CLIError, rule="a non-negative integer (numpy's seeds are)")
    _check_positive("--batch-size", args.batch_size)
    strengths = list(args.strengths or [])
    for s in strengths:
        check_float(s, "--strengths", error=CLIError)
    _check_out(args)
    texts = _texts(args)
    intervention = parse_spec(args.intervention)
    for s in strengths:  # every variant is checked before the model is loaded
        intervention.with_strength(s)
    model = _load(args)
    _check_context(model, args.max_tokens)
    batch = tokenize(model, texts, prepend_bos=args.prepend_bos, max_tokens=args.max_tokens)
    settings = dict(eps=args.eps, batch_size=args.batch_size, n_resamples=args.n_resamples, seed=args.seed)
    with contextlib.ExitStack() as held:
        if strengths:  # the sweep's resumable folder is this run's alone, from before the first forward
            partial = _sweep_partial(args, batch, intervention, strengths, settings)
            held.enter_context(exclusive(partial, f"--out {args.out}: the same sweep's folder"))
            held.callback(_drop_unstarted, partial)
        effect = measure_effect(model, batch, intervention, control=args.control, progress=True,
                                metadata={"max_tokens": args.max_tokens}, **settings)
        doc = _write_effect(args, model, batch, effect, intervention, strengths, settings)
    t = effect.summary["target_sink_score"]
    kl = effect.summary["kl"]["delta"]
    note = doc.get("ci95_note") or t.get("ci95_note")
    ci = f"no CI: {note}" if note else f"95% CI {t['ci95'][0]:+.4f}..{t['ci95'][1]:+.4f}"
    change = (t["note"] if "note" in t else  # an empty target is explained, never printed as nan
              f"target sink score {t['clean']:.4f} -> {t['intervened']:.4f} (delta {t['delta']:+.4f}, {ci})")
    print(f"{effect.clean.model}: {effect.spec}: {change}; KL {kl:.4g} nats/token; wrote {args.out}/effect.json")
    return 0


def _drop_unstarted(partial: Path) -> None:
    """Remove the sweep folder of a run that ended before its first finished item (nothing to resume)."""
    items = partial / "items"
    if partial.is_dir() and not (items.is_dir() and any(items.glob("*.csv"))):
        shutil.rmtree(partial, ignore_errors=True)


def _sweep_partial(args, batch, intervention, strengths, settings) -> Path:
    """Where an interrupted ``--strengths`` sweep keeps its finished items: a hidden folder next to
    ``--out`` named by everything that decides them, so only the same command resumes them. A run
    holds it (:func:`circuits.output.exclusive`) from before its first forward: the same command
    started again while the first runs is refused at once, instead of sharing (and losing) it."""
    key = json.dumps([args.model, args.dtype, args.intervention, strengths, batch.token_ids, settings], sort_keys=True)
    out = args.out.absolute()
    return out.parent / f".{out.name}.sweep-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _write_effect(args, model, batch, effect, intervention, strengths, settings) -> dict:
    """effect.json, its figures and view.html, plus the dose-response sweep with ``--strengths``, atomically.

    The sweep runs in :func:`_sweep_partial`'s folder, which survives an interruption (the sweep
    skips finished items when the same command is run again) and moves into ``--out`` at the end.
    """
    # deferred: the command starts without torch; a job imports what it runs
    from circuits import plots
    from circuits.output import atomic_output_dir, write_json
    from circuits.view import write_view
    from interventions.sweep import sweep
    from sinkscope.jobs import effect_ci_note

    with atomic_output_dir(args.out) as folder:
        doc = effect.to_json()
        note = effect_ci_note(effect.clean.n_sequences, args.n_resamples)
        if note:
            doc["ci95_note"] = note
        tokens = effect.clean.tokens[0] if effect.clean.n_sequences == 1 else None
        title = f"{effect.clean.model}: {effect.spec}: change of the sink score (n={effect.clean.n_sequences})"
        plots.save(plots.sink_delta_heatmap(effect.frame, tokens=tokens, target_positions=effect.target.positions,
                                            title=title), folder / "sink_delta_heatmap.png")
        write_view(effect, folder, eps=args.eps)  # clean, intervened and delta, switchable
        if strengths:
            partial = _sweep_partial(args, batch, intervention, strengths, settings)
            try:
                result = sweep(model, batch, intervention, {"strength": strengths}, partial, format="csv",
                               positions="target", progress=True, **settings)
            except KeyboardInterrupt:
                done = len(list((partial / "items").glob("*.csv")))
                if not done:
                    raise  # nothing finished, nothing kept (the folder goes with the run)
                raise Interrupted(f"{done} of {len(strengths)} finished sweep items are kept in {partial}; "
                                  "run the same command again to resume") from None
            os.replace(partial, folder / "sweep")
            plots.save(plots.dose_response(result.frame, title=f"{effect.clean.model}: dose-response of {effect.spec}"),
                       folder / "dose_response.png")
            curve = result.frame[result.frame["metric"].isin(["target_sink_score", "next_token_loss", "kl"])]
            keep = ["iv_strength", "spec", "metric", "n", "clean", "intervened", "delta", "ci_low", "ci_high"]
            doc["dose_response"] = curve[keep].astype(object).where(curve[keep].notna(), None).to_dict(orient="records")
        write_json(folder / "effect.json", doc)
    return doc


COMMANDS = {
    "models": (_add_models, _run_models),
    "measure": (_add_measure, _run_measure),
    "demo": (_add_demo, _run_demo),
    "intervene": (_add_intervene, _run_intervene),
    "pretrain": (add_pretrain, run_pretrain),
    "lab-compare": (add_lab_compare, run_lab_compare),
    "reproduce": (_add_reproduce, _run_reproduce),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sinkscope", description="Causal, mechanistic study of attention sinks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


#: SIGINT (Ctrl-C), SIGTERM and SIGHUP (the terminal closed) all unwind the run
_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _terminate(signum, frame):
    """The first stop signal unwinds like Ctrl-C (staging folders are removed on the way out);
    later ones are ignored until the run has cleaned up, so a second Ctrl-C cannot cut the
    clean-up short or end the process by the signal instead of exit code 130."""
    for sig in _STOPS:
        signal.signal(sig, _cleaning_up)
    raise KeyboardInterrupt


def _cleaning_up(signum, frame):
    return None  # already unwinding: let the clean-up finish


def main(argv: list[str] | None = None) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = {sig: signal.signal(sig, _terminate) for sig in _STOPS} if in_main_thread else {}
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command][1](args)
    except SinkscopeError as exc:
        print(f"sinkscope: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as exc:
        print(f"sinkscope: interrupted; {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("sinkscope: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        stopping = signal.getsignal(signal.SIGINT) is _cleaning_up if in_main_thread else False
        if not (stopping and argv is None):  # the command itself keeps ignoring stops until the process exits
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
