"""``sinkscope reproduce``: every paper analysis on one model, one self-contained report.

Each claim of the three seed papers gets a verdict — *holds*, *partly holds* or *does not
hold* — computed from numbers measured in the same run; no verdict is written by hand. The
package is laid out the way the work divides:

* :mod:`~sinkscope.reproduce.claims` — a claim as a record (id, thresholds, evidence, *holds*
  and *partly* conditions) whose rule text is written from the same condition objects that
  decide the verdict;
* :mod:`~sinkscope.reproduce.wong`, :mod:`~sinkscope.reproduce.li`, :mod:`~sinkscope.reproduce.gu`
  — one module per paper: its ``measure(model, obs, settings)`` returns the numbers its
  ``CLAIMS`` read (:func:`evaluate` turns them into findings), its ``FIGURES`` are the
  report's figures of that paper (:mod:`~sinkscope.reproduce.figures`: file name, caption, title),
  and its ``section`` writes that paper's part of ``report.md``;
* :mod:`~sinkscope.reproduce.report` — :func:`reproduce` writes ``report.md`` (the header, the
  verdicts, then each paper's section), the figures and ``numbers.json``; :func:`redraw`
  re-renders figures from ``numbers.json``, drawn by the same ``FIGURES`` records;
* :mod:`~sinkscope.reproduce.markdown` — the Markdown table writer the report and the paper
  sections share;
* :mod:`~sinkscope.reproduce.settings` — the size knobs, :data:`SIZES` ``"full"`` and ``"ci"``.

Inputs (``size="full"``; ``"ci"`` shrinks every count and length so the notebooks and tests
run in a minute or two):

* Wong et al. and the observational parts of Li and Gu: 6 long inputs, truncated to 1,024
  tokens, one forward pass each with every meter attached
  (:func:`circuits.long_inputs.observe_long_inputs`). On the packaged models they are the
  model's own multi-turn chain-of-thought sessions on math problems written for the project
  (:func:`circuits.probes.trace_batch`, generated once by ``scripts/generate_traces.py`` and
  committed), as Wong et al. analyse the model's own reasoning; any other model gets the
  hand-written reasoning traces (:func:`circuits.probes.reasoning_texts`). ``Settings.inputs``
  chooses, and ``numbers.json`` records which.
* Interventions that need many runs (planting, key bias) use the built-in probe passages
  (:func:`circuits.probes.probe_texts`), shorter; Gu's Sink_1^eps uses his standard setting,
  100 passages × 64 tokens. Planting and the dose response are the recipes'
  (:func:`interventions.recipes.plant_sink`, :func:`interventions.recipes.rescale_dose_response`):
  one protocol for the library and the report.
* The BOS policy is each model's native one, and recorded: the hand-written traces get no BOS
  on SmolLM2 and Qwen2.5 and a BOS on Gemma 3; the models' own sessions start as their chat
  template starts (``<|im_start|>``, which is SmolLM2's BOS token and not Qwen2.5's, which has
  none) or, on Gemma 3, with its BOS. Positions are 0-based: the papers' Sink_1 is position 0.

Thresholds are the toolkit's, chosen before looking at any model; each claim's are stored in
``numbers.json`` under ``rules``, and its rule text next to its verdict. Wong et al.'s verdicts
count each secondary sink once, in the model's own generated tokens
(:data:`~sinkscope.reproduce.wong.COUNTING`); sinks in the chat template, system prompt and
problem text are reported beside them (:mod:`circuits.parts`).
"""

from __future__ import annotations

import sys
import types

from sinkscope.reproduce import gu, li, wong
from sinkscope.reproduce.claims import FAILS, HOLDS, PARTLY, Claim, Finding, Measured, evaluate, findings_frame, verdict
from sinkscope.reproduce.gu import offline_models
from sinkscope.reproduce.markdown import md_table
from sinkscope.reproduce.report import CLAIMS, ReproduceError, claims_table, redraw, reproduce
from sinkscope.reproduce.settings import SIZES, Settings, Size

__all__ = [
    "CLAIMS", "Claim", "FAILS", "Finding", "HOLDS", "Measured", "PARTLY", "ReproduceError", "SIZES", "Settings", "Size", "claims_table",
    "evaluate", "findings_frame", "gu", "li", "md_table", "offline_models", "redraw", "reproduce", "verdict", "wong",
]


class _RunnablePackage(types.ModuleType):
    """The package is also the entry point ``ss.reproduce``: importing a subpackage sets the
    parent's attribute of that name, so ``sinkscope.reproduce`` must itself run the papers.
    ``sinkscope.reproduce(model, out, ...)`` is :func:`~sinkscope.reproduce.report.reproduce`."""

    def __call__(self, *args, **kwargs):
        return reproduce(*args, **kwargs)


sys.modules[__name__].__class__ = _RunnablePackage
