"""Rewrite README's cross-model verdict table from the committed reports' ``numbers.json``.

Why generated: the table quotes every committed report, and a hand-edited copy drifts from
them (it did once: the 2026-11-23 table outlived two re-runs). ``make verdicts`` rewrites the
block between :data:`sinkscope.reproduce.report.VERDICT_MARKERS`; ``tests/test_verdicts.py``
fails when README and the reports disagree.

    python scripts/update_verdicts.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sinkscope.reproduce.report import VERDICT_MARKERS, committed_reports, verdict_table  # noqa: E402


def rewrite(readme: str, table: str) -> str:
    begin, end = VERDICT_MARKERS
    if begin not in readme or end not in readme:
        raise SystemExit(f"README.md has no verdict block ({begin} ... {end})")
    head, rest = readme.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{table}\n{end}{tail}"


def main() -> int:
    path = ROOT / "README.md"
    path.write_text(rewrite(path.read_text(encoding="utf-8"), verdict_table(committed_reports(ROOT))), encoding="utf-8")
    print(f"rewrote the verdict table in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
