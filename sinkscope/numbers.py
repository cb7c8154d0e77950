"""How sinkscope prints a number in its reports, rule texts and tables: written once.

Three styles, all printing a missing value (None, NaN, ±inf: ``numbers.json`` stores NaN as
null) as "–" unless told otherwise:

* ``fixed``: ``digits`` decimals (``0.25`` -> ``"0.25"`` with 2 digits);
* ``adaptive``: ``digits`` decimals without trailing zeros, switching to ``digits`` significant
  digits for very large or very small values (tables of mixed magnitudes);
* ``significant``: ``digits`` significant digits (thresholds in rule texts: ``0.3``, ``1e+03``).
"""

from __future__ import annotations

import math
from typing import Literal

Style = Literal["fixed", "adaptive", "significant"]
MISSING = "–"


def is_missing(x) -> bool:
    """None, NaN or an infinity (a Python or a numpy number)."""
    return x is None or not math.isfinite(float(x))


def number(x, digits: int = 2, style: Style = "fixed", *, missing: str | None = MISSING) -> str:
    """``x`` as text in ``style`` (see the module doc); ``missing=None`` formats NaN as Python does."""
    if missing is not None and is_missing(x):
        return missing
    if style == "significant":
        return f"{x:.{digits}g}"
    if style == "adaptive":
        if abs(x) >= 1e4 or 0 < abs(x) < 1e-3:
            return f"{x:.{digits}g}"
        return f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return f"{x:.{digits}f}"


__all__ = ["MISSING", "Style", "is_missing", "number"]
