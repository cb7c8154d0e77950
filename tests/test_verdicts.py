"""README's cross-model verdict table is the committed reports' verdicts, word for word."""

from __future__ import annotations

import importlib.util

from helpers import ROOT
from sinkscope.reproduce.report import CLAIMS, VERDICT_MARKERS, committed_reports, verdict_table


def _script():
    spec = importlib.util.spec_from_file_location("update_verdicts", ROOT / "scripts" / "update_verdicts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_equals_the_committed_reports():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    expected = _script().rewrite(readme, verdict_table(committed_reports(ROOT)))
    assert readme == expected, "README's verdict table is stale: run `make verdicts`"


def test_one_row_per_claim_and_one_column_per_committed_report():
    docs = committed_reports(ROOT)
    lines = verdict_table(docs).splitlines()
    assert len(lines) == 2 + len(CLAIMS) + 1
    assert all(line.count(" | ") == len(docs) for line in lines[2:])
    begin, end = VERDICT_MARKERS
    assert begin.startswith("<!--") and end.startswith("<!--")


def test_a_claim_missing_from_a_report_shows_a_dash():
    docs = committed_reports(ROOT)
    name = next(iter(docs))
    trimmed = {name: {**docs[name], "claims": [c for c in docs[name]["claims"] if c["id"] != "W1"]}}
    row = next(line for line in verdict_table(trimmed).splitlines() if line.startswith("| **W1**"))
    assert row.endswith("| – |")
