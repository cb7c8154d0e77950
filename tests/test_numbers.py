"""sinkscope.numbers: the one way reports, rule texts and tables print a number (hand-checked)."""

from __future__ import annotations

import numpy as np

from sinkscope.numbers import number


def test_the_three_styles_and_missing_values():
    assert number(0.25) == "0.25" and number(1 / 3, 3) == "0.333"
    assert number(0.5, 3, "adaptive") == "0.5" and number(12345.0, 3, "adaptive") == "1.23e+04" and number(2e-4, 2, "adaptive") == "0.0002"
    assert number(0.3, 3, "significant") == "0.3" and number(1000.0, 3, "significant") == "1e+03"
    assert number(None) == number(float("nan")) == number(np.float32("inf")) == "–"
    assert number(float("nan"), 3, "significant", missing=None) == "nan"
