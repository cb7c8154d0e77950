"""A figure of a paper's report as a record: its file name, caption, title and drawing, written once.

Why this module exists. A report figure used to be spelled out twice, in the paper's report
section and again in :func:`~sinkscope.reproduce.report.redraw`, and the two copies drifted
(their titles differed). Now each paper module (:mod:`~sinkscope.reproduce.wong`,
:mod:`~sinkscope.reproduce.li`, :mod:`~sinkscope.reproduce.gu`) lists its figures in ``FIGURES``
as :class:`PaperFigure` records, and both the report and ``redraw`` draw from those records.

A figure is *redrawable* when it is a function of the paper's part of ``numbers.json`` alone:
``draw(numbers, model)``, with ``numbers`` as that file holds them (:func:`as_saved`), so the
report draws exactly what ``redraw`` draws later. The others need per-token data of the run that
``numbers.json`` does not keep: ``draw(res, obs)`` with the paper's
:class:`~sinkscope.reproduce.claims.Measured` and the long-input pass; only the report draws them.
The drawing functions stay in :mod:`circuits.plots` and :mod:`circuits.paper_plots`, where the
notebooks call them on their own tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from circuits.output import to_jsonable


@dataclass(frozen=True)
class PaperFigure:
    """One figure of a paper's report section."""

    #: the file's stem: the report writes ``<name>.png``
    name: str
    #: the caption under the figure in ``report.md``; a function of ``draw``'s arguments when it names what the run chose
    caption: str | Callable[..., str]
    #: returns the matplotlib figure, or None when the run has nothing to draw (e.g. no dose response)
    draw: Callable[..., Any]
    #: ``draw(numbers, model)`` reads only ``numbers.json`` (True), or ``draw(res, obs)`` reads the run's per-token data (False)
    redrawable: bool = True

    def caption_for(self, *args) -> str:
        """The caption for the figure drawn from ``args``."""
        return self.caption(*args) if callable(self.caption) else self.caption


def as_saved(numbers: dict) -> dict:
    """A paper's numbers as ``numbers.json`` holds them (numpy values as Python ones, NaN as null):
    what a redrawable figure reads, in the report and in ``redraw`` alike."""
    return json.loads(json.dumps(to_jsonable(numbers), allow_nan=False))


__all__ = ["PaperFigure", "as_saved"]
