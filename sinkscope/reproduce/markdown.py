"""Markdown helpers shared by the report and the paper modules' sections.

Why this module exists. Each paper module (:mod:`~sinkscope.reproduce.wong`,
:mod:`~sinkscope.reproduce.li`, :mod:`~sinkscope.reproduce.gu`) writes its own section of
``report.md``, and :mod:`~sinkscope.reproduce.report` assembles them; both need the same table
writer. It lives here, below both, so the paper modules never import the report that imports them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from sinkscope.numbers import number

#: what a paper's ``section`` calls to put a figure into the report: ``figure(spec, *args)`` draws
#: the :class:`~sinkscope.reproduce.figures.PaperFigure` ``spec`` from ``args``, saves it next to
#: ``report.md`` and returns its Markdown (image and caption; empty when there is nothing to draw)
Figure = Callable[..., str]


def md_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a Markdown table (no extra dependency)."""
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return number(v, digits, "adaptive")
        if isinstance(v, (list, tuple)):
            return ", ".join(fmt(x) for x in v)
        return str(v).replace("|", "\\|").replace("\n", "\\n")

    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if frame[c].dtype.kind in "fiu" else ":--" for c in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


__all__ = ["Figure", "md_table"]
