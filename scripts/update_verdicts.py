"""Rewrite the cross-model verdict table of the documentation's results page (docs/results.md)
from the committed reports' ``numbers.json``.

Why generated: the table quotes every committed report, and a hand-edited copy drifts from
them (it did once: the 2026-11-23 table outlived two re-runs). ``make verdicts`` rewrites the
block between :data:`sinkscope.reproduce.report.VERDICT_MARKERS`; ``tests/test_verdicts.py``
fails when the page and the reports disagree. (The table lived in README.md until 2026-12-06.)

    python scripts/update_verdicts.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
#: the page that holds the generated table
PAGE = ROOT / "docs" / "results.md"

from sinkscope.reproduce.report import VERDICT_MARKERS, committed_reports, verdict_table  # noqa: E402


def rewrite(page: str, table: str) -> str:
    begin, end = VERDICT_MARKERS
    if begin not in page or end not in page:
        raise SystemExit(f"{PAGE.relative_to(ROOT)} has no verdict block ({begin} ... {end})")
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{table}\n{end}{tail}"


def main() -> int:
    PAGE.write_text(rewrite(PAGE.read_text(encoding="utf-8"), verdict_table(committed_reports(ROOT))), encoding="utf-8")
    print(f"rewrote the verdict table in {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
