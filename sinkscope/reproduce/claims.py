"""Paper claims as records, and the machinery that turns numbers into verdicts.

Why this module exists. A reproduction is only as honest as its verdict rules, and a rule
written twice (once as code, once as prose for the reader) drifts. Here a claim is data: an
id (``"W2"``), its paper and text, named thresholds, a function that picks its evidence numbers
from the paper's measurements, and two conditions — *holds* and *partly holds* — built from
comparisons of those evidence numbers with the thresholds. The same condition objects decide
the verdict and write the rule text, so the rule a report prints is the rule that ran.

* :class:`Test` — one comparison, ``evidence[metric] op threshold``; :class:`AllOf` and
  :class:`AnyOf` combine them.
* :class:`Claim` — the record; :meth:`Claim.evaluate` returns a :class:`Finding` (verdict,
  evidence numbers, a one-line evidence text, the rule text).
* :class:`Method` — the paper's method, the toolkit's, and every difference between them,
  which the report prints under each claim (issue 11: a reader must see where they part).
* :class:`Measured` — what a paper module's ``measure`` hands over: the numbers its claims
  read (and ``numbers.json`` keeps), the tables the report draws, and section timings.

A missing or NaN evidence number fails every comparison it is in, so a claim without data does
not hold.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence, Union

import pandas as pd

from sinkscope.numbers import number

Verdict = Literal["holds", "partly holds", "does not hold"]
HOLDS: Verdict = "holds"
PARTLY: Verdict = "partly holds"
FAILS: Verdict = "does not hold"

Op = Literal[">=", "<=", ">", "<", "=="]
_OPS: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    ">=": (operator.ge, "≥"), "<=": (operator.le, "≤"), ">": (operator.gt, ">"), "<": (operator.lt, "<"), "==": (operator.eq, "="),
}


def verdict(holds: bool, partly: bool) -> Verdict:
    """*holds* when ``holds``, else *partly holds* when ``partly``, else *does not hold*."""
    return HOLDS if holds else PARTLY if partly else FAILS


def number_text(x: float) -> str:
    """A threshold as the rule text prints it (3 significant digits, no trailing zeros)."""
    return number(x, 3, "significant", missing=None)


@dataclass(frozen=True)
class Test:
    """``evidence[metric] op threshold``; ``threshold`` names one of the claim's thresholds or
    is a constant; ``label`` is how the metric reads in the rule text (default: its key), where
    ``{name}`` is replaced by the threshold ``name`` (a threshold the measurement uses)."""

    metric: str
    op: Op
    threshold: str | float
    label: str = ""

    def bound(self, thresholds: Mapping[str, float]) -> float:
        return thresholds[self.threshold] if isinstance(self.threshold, str) else self.threshold

    def passes(self, evidence: Mapping[str, Any], thresholds: Mapping[str, float]) -> bool:
        x = evidence.get(self.metric)
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return False
        return bool(_OPS[self.op][0](x, self.bound(thresholds)))

    def text(self, thresholds: Mapping[str, float], nested: bool = False) -> str:
        label = (self.label or self.metric).format_map({k: number_text(v) for k, v in thresholds.items()})
        return f"{label} {_OPS[self.op][1]} {number_text(self.bound(thresholds))}"


@dataclass(frozen=True)
class AllOf:
    """Every part passes."""

    parts: tuple[Condition, ...]

    def passes(self, evidence: Mapping[str, Any], thresholds: Mapping[str, float]) -> bool:
        return all(p.passes(evidence, thresholds) for p in self.parts)

    def text(self, thresholds: Mapping[str, float], nested: bool = False) -> str:
        body = " and ".join(p.text(thresholds, nested=True) for p in self.parts)
        return f"({body})" if nested and len(self.parts) > 1 else body


@dataclass(frozen=True)
class AnyOf:
    """At least one part passes."""

    parts: tuple[Condition, ...]

    def passes(self, evidence: Mapping[str, Any], thresholds: Mapping[str, float]) -> bool:
        return any(p.passes(evidence, thresholds) for p in self.parts)

    def text(self, thresholds: Mapping[str, float], nested: bool = False) -> str:
        body = " or ".join(p.text(thresholds, nested=True) for p in self.parts)
        return f"({body})" if nested and len(self.parts) > 1 else body


Condition = Union[Test, AllOf, AnyOf]


@dataclass(frozen=True)
class Method:
    """How the paper measured a claim, how the toolkit does, and each difference (one line each)."""

    paper: str
    toolkit: str
    differences: tuple[str, ...] = ()

    def markdown(self) -> str:
        lines = [f"- *Paper:* {self.paper}", f"- *Toolkit:* {self.toolkit}"]
        lines += [f"- *Difference:* {d}" for d in self.differences] or ["- *Difference:* none known"]
        return "\n".join(lines)


@dataclass(frozen=True)
class Finding:
    """A claim evaluated on one run: what ``numbers.json`` stores under ``claims``."""

    id: str
    paper: str
    claim: str
    verdict: Verdict
    evidence: str
    rule: str
    numbers: dict[str, Any]


@dataclass(frozen=True)
class Claim:
    """One paper claim (see the module docstring).

    ``evidence(numbers, thresholds)`` returns the evidence numbers (a flat dict) from the paper
    module's numbers; ``describe(evidence)`` writes them as one line for the verdict table.
    """

    id: str
    paper: str
    claim: str
    thresholds: Mapping[str, float]
    evidence: Callable[[Mapping[str, Any], Mapping[str, float]], dict[str, Any]]
    holds: Condition
    partly: Condition
    describe: Callable[[Mapping[str, Any]], str]
    method: Method | None = None
    rule_note: str = ""  # e.g. that the rule was set after numbers were seen

    @property
    def rule(self) -> str:
        """The verdict rule as text, written from :attr:`holds`, :attr:`partly` and the thresholds."""
        note = f" (rule {self.rule_note})" if self.rule_note else ""
        return f"holds: {self.holds.text(self.thresholds)}; partly: {self.partly.text(self.thresholds)}{note}"

    def evaluate(self, numbers: Mapping[str, Any]) -> Finding:
        ev = self.evidence(numbers, self.thresholds)
        v = verdict(self.holds.passes(ev, self.thresholds), self.partly.passes(ev, self.thresholds))
        return Finding(self.id, self.paper, self.claim, v, self.describe(ev), self.rule, ev)


@dataclass
class Measured:
    """What a paper module's ``measure`` returns: ``numbers`` (JSON-able; its claims read them and
    ``numbers.json`` keeps them under the paper's key), ``frames`` (the tables the report shows
    and draws, some richer than ``numbers``) and ``timings`` (seconds per costly step)."""

    numbers: dict[str, Any]
    frames: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def evaluate(claims: Sequence[Claim], numbers: Mapping[str, Any]) -> list[Finding]:
    """Every claim of ``claims`` evaluated on one paper's ``numbers``."""
    return [c.evaluate(numbers) for c in claims]


def findings_frame(findings: Sequence[Finding]) -> pd.DataFrame:
    """The findings as a table (id, paper, claim, verdict, evidence, rule), e.g. for a notebook."""
    return pd.DataFrame([{k: getattr(f, k) for k in ("id", "paper", "claim", "verdict", "evidence", "rule")} for f in findings])


__all__ = [
    "AllOf", "AnyOf", "Claim", "Condition", "FAILS", "Finding", "HOLDS", "Measured", "Method", "PARTLY", "Test", "Verdict", "evaluate",
    "findings_frame", "number_text", "verdict",
]
