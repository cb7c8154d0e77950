"""The cross-model verdict table of the results page (docs/results.md) is the committed reports'
verdicts, word for word."""

from __future__ import annotations

from helpers import ROOT, load_script
from sinkscope.reproduce.report import CLAIMS, VERDICT_MARKERS, committed_reports, verdict_table

RESULTS = ROOT / "docs" / "results.md"


def test_results_table_equals_the_committed_reports():
    page = RESULTS.read_text(encoding="utf-8")
    expected = load_script("update_verdicts").rewrite(page, verdict_table(committed_reports(ROOT)))
    assert page == expected, "the verdict table of docs/results.md is stale: run `make verdicts`"


def test_one_row_per_claim_and_one_column_per_committed_report():
    docs = committed_reports(ROOT)
    lines = verdict_table(docs).splitlines()
    assert len(lines) == 2 + len(CLAIMS) + 1
    assert all(line.count(" | ") == len(docs) for line in lines[2:])
    page = RESULTS.read_text(encoding="utf-8")
    begin, end = VERDICT_MARKERS  # the table is rewritten between them: each once, in order
    assert page.count(begin) == 1 and page.count(end) == 1 and page.index(begin) < page.index(end)
    assert begin not in (ROOT / "README.md").read_text(encoding="utf-8"), "one generated table, on the results page"


def test_a_claim_missing_from_a_report_shows_a_dash():
    docs = committed_reports(ROOT)
    name = next(iter(docs))
    trimmed = {name: {**docs[name], "claims": [c for c in docs[name]["claims"] if c["id"] != "W1"]}}
    row = next(line for line in verdict_table(trimmed).splitlines() if line.startswith("| **W1**"))
    assert row.endswith("| – |")


def test_publishing_a_report_replaces_the_old_figures_and_rewrites_links(tmp_path):
    import json

    import pytest

    run, root = tmp_path / "run", tmp_path / "repo"
    run.mkdir()
    (run / "numbers.json").write_text(json.dumps({"model": "m-1", "size": "full"}))
    (run / "a_b.png").write_bytes(b"png")
    (run / "report.md").write_text("![x](a_b.png) and [numbers](numbers.json), not (a_b.png) or ](other/a.png)")
    old = root / "docs" / "figures" / "m-1"
    old.mkdir(parents=True)
    (old / "stale.png").write_bytes(b"old")
    target = load_script("publish_report").publish(run, root)
    assert target == root / "docs" / "reproduce-m-1.md"
    assert target.read_text() == "![x](figures/m-1/a_b.png) and [numbers](figures/m-1/numbers.json), not (a_b.png) or ](other/a.png)"
    assert sorted(p.name for p in old.iterdir()) == ["a_b.png", "numbers.json"]
    (run / "numbers.json").write_text(json.dumps({"model": "m-1", "size": "long"}))
    assert load_script("publish_report").publish(run, root) == root / "docs" / "reproduce-m-1-long.md"
    assert (root / "docs" / "figures" / "m-1-long" / "a_b.png").is_file() and (old / "a_b.png").is_file()
    assert list(committed_reports(root)) == ["m-1"]  # the verdict table reads full-size runs only
    (run / "numbers.json").write_text(json.dumps({"model": "m-1", "size": "ci"}))
    with pytest.raises(SystemExit, match="only full and long runs are committed"):
        load_script("publish_report").publish(run, root)
