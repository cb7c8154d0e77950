"""The view marks which part of the input each token belongs to (template, problem, generated).

Without a browser: what the page embeds (each shown sequence's parts as runs) and what it refuses.
In a browser (headless Chromium, as ``tests/test_view_browser.py``): the tokens carry the part's
class and marking, and the detail panel names the part.
"""

from __future__ import annotations

import pytest

from circuits.parts import to_spans
from circuits.view import ViewError, view, view_data, write_view
from synthetic import synthetic
from test_view_browser import Page, browser  # noqa: F401 (the headless-Chromium fixture, skipped without one)

#: 10 template tokens, 5 of the problem, then the model's own (as a session's first turn)
LABELS = ["template"] * 10 + ["problem"] * 5 + ["generated"] * 25


def _parts(lengths):
    return [LABELS[:n] for n in lengths]


def test_the_page_carries_each_sequences_parts_as_runs():
    meas = synthetic((40, 30), secondary=(5,))
    data = view_data(meas, parts=_parts((40, 30)))
    assert data["sequences"][0]["parts"] == [[0, 10, "template"], [10, 15, "problem"], [15, 40, "generated"]]
    assert data["sequences"][1]["parts"] == to_spans(LABELS[:30]) == [[0, 10, "template"], [10, 15, "problem"], [15, 30, "generated"]]
    # the runs of the sequences shown, whichever they are
    assert [s["parts"] for s in view_data(meas, parts=_parts((40, 30)), sequences=[1])["sequences"]] == [to_spans(LABELS[:30])]
    # no parts (plain text): null, and the page works as before
    assert [s["parts"] for s in view_data(meas)["sequences"]] == [None, None]


def test_parts_of_the_wrong_shape_are_refused_by_name():
    meas = synthetic((40, 30))
    with pytest.raises(ViewError, match="parts: 1 sequences of labels for 2 sequences"):
        view_data(meas, parts=_parts((40,)))
    with pytest.raises(ViewError, match="parts: sequence 1 has 40 labels for 30 tokens"):
        view_data(meas, parts=_parts((40, 40)))
    with pytest.raises(ViewError, match="the label 'system'"):
        view_data(meas, parts=[["system"] * 40, LABELS[:30]])


def test_the_page_holds_the_marking_and_view_passes_parts_on(tmp_path):
    meas = synthetic((40,), secondary=(5,))
    page = view(meas, parts=_parts((40,))).html
    for needle in ("#text span.part-template", "#text span.part-problem", ".badge.part-generated", "function whereOf"):
        assert needle in page
    path = write_view(meas, tmp_path, parts=_parts((40,)))
    assert '"parts":[[0,10,"template"],[10,15,"problem"],[15,40,"generated"]]' in path.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------ in a browser


@pytest.mark.browser
def test_tokens_are_marked_by_part_and_the_detail_names_it(browser, tmp_path):  # noqa: F811 (the fixture)
    meas = synthetic((40,), secondary=(5,))
    page = Page(browser, write_view(meas, tmp_path, parts=_parts((40,))))
    classes = [page.token(k).get_attribute("class") or "" for k in range(40)]
    assert [next((c for c in cls.split() if c.startswith("part-")), None) for cls in classes] == ["part-" + p for p in LABELS]
    assert "primary" in classes[0] and "secondary" in classes[5]  # the other markings stay
    template, problem, own = (page.token(k) for k in (3, 12, 20))
    assert template.value_of_css_property("border-top-style") == "dotted"
    assert problem.value_of_css_property("border-top-style") == "solid"
    assert own.value_of_css_property("border-top-style") == "none"
    page.hover(problem)
    assert page.text("#d-pos") == "12" and "part: the problem text" in page.text("#d-badges")
    page.hover(own)
    assert "part: generated: the model's own token" in page.text("#d-badges")
    legend = page.text("#legend")
    assert "template" in legend and "problem" in legend and "generated (no line)" in legend
    page.shot(tmp_path / "parts.png")
    (tmp_path / "plain").mkdir()
    plain = Page(browser, write_view(meas, tmp_path / "plain"))  # no parts: no marking, no part badge
    plain.hover(plain.token(12))
    assert plain.text("#d-pos") == "12" and "part-" not in (plain.token(12).get_attribute("class") or "")
    assert "part:" not in plain.text("#d-badges") and "generated" not in plain.text("#legend")
