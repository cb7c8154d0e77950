"""The interactive view's page, without a browser: what it embeds, how big it is, where it is written.

The browser side (slider, hover, timings at 8k tokens) is ``tests/test_view_browser.py``.
"""

from __future__ import annotations

import html
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from circuits.output import MANIFEST
from circuits.view import View, ViewError, view, view_data
from sinkscope.cli import main
from synthetic import synthetic


def embedded(page: str) -> dict:
    """The JSON the page carries, parsed as the browser parses it."""
    m = re.search(r'<script id="sinkscope-data" type="application/json">(.*?)</script>', page, re.S)
    assert m, "the page must carry its data in one JSON script block"
    return json.loads(m.group(1))


def test_the_page_carries_the_measurement_at_four_significant_digits():
    meas = synthetic((40, 25), secondary=(5,))
    data = embedded(view(meas).html)
    assert data["kind"] == "measurement" and data["n_layers"] == 30 and data["n_heads"] == 9
    seq = data["sequences"][1]
    assert seq["tokens"] == meas.tokens[1] and len(seq["score"]["measurement"][0]) == 25
    shown = np.array(seq["score"]["measurement"], dtype=float)  # null -> nan
    truth = meas.sink_score[1, :, :25]
    np.testing.assert_array_equal(np.isnan(shown), np.isnan(truth))  # the last token has no score
    ok = ~np.isnan(truth)
    np.testing.assert_allclose(shown[ok], truth[ok], rtol=5e-4, atol=0)
    # small measurement: alpha per head for every token, layer-major rows of layers x heads
    assert data["alpha_complete"] and seq["alpha_positions"] == list(range(25))
    alpha = np.array(seq["alpha"]["measurement"])
    np.testing.assert_allclose(alpha.reshape(25, 30, 9), meas.alpha[1, :, :, :25].transpose(2, 0, 1), rtol=5e-4)
    # the secondary sinks are anatomy.secondary_sinks' rows (those of sinks.json)
    (row,) = seq["secondary"]["measurement"]
    assert (row["position"], row["start_layer"], row["lifetime"], row["kind"]) == (5, 2, 7, "secondary")


def test_the_page_is_self_contained():
    page = view(synthetic((20,))).html
    # nothing to fetch: no external script, style, font or image, and a CSP that forbids any
    assert not re.search(r"<(link|img|iframe)\b", page)
    assert not re.search(r"""\s(src|href)\s*=""", page)
    assert not re.search(r"\b(fetch|XMLHttpRequest|WebSocket|import)\s*\(", page)
    assert "default-src 'none'" in page
    assert re.findall(r"https?://[^\s\"']+", page) == ["http://www.w3.org/2000/svg"]  # an XML namespace name, never fetched


def test_a_token_cannot_end_the_data_block():
    meas = synthetic((6,), secondary=())
    meas.tokens[0][1] = "</script><script>alert(1)</script>"
    page = view(meas).html
    assert page.count("</script>") == 2  # the data block's and the script's
    assert embedded(page)["sequences"][0]["tokens"][1] == "</script><script>alert(1)</script>"


def test_at_8k_tokens_alpha_per_head_is_kept_for_the_tokens_that_matter(record_property):
    meas = synthetic((8192,), secondary=(5, 4000, 8000))
    v = view(meas)
    data = v.data
    seq = data["sequences"][0]
    kept = seq["alpha_positions"]
    assert not data["alpha_complete"] and data["alpha_tokens"] == len(kept) <= 150_000 // 270
    assert {0, 5, 4000, 8000} <= set(kept), "the first token and every secondary sink keep their alpha"
    peak = np.nan_to_num(meas.sink_score[0], nan=-1).max(axis=0)
    others = [p for p in np.argsort(-peak) if p not in (0, 5, 4000, 8000)]
    assert set(others[:100]) <= set(kept), "then the most attended tokens"
    assert len(seq["score"]["measurement"][0]) == 8192, "sink scores for every position"
    size = v.size_bytes
    record_property("view_bytes_8k", size)
    assert size < 4_000_000, f"{size / 1e6:.2f} MB at 8k tokens x 30 layers"


def test_sequences_beyond_the_size_budget_are_left_out_and_said_so():
    meas = synthetic((50,) * 10)
    data = view_data(meas, max_values=50 * 30 * 3)
    assert [s["index"] for s in data["sequences"]] == [0, 1, 2] and data["n_sequences"] == 10
    assert [s["index"] for s in view_data(meas, sequences=[7, 2])["sequences"]] == [7, 2]
    with pytest.raises(ViewError, match="sequences: 10 is out of range 0..9"):
        view_data(meas, sequences=[10])
    with pytest.raises(ViewError, match="at least one sequence"):
        view_data(meas, sequences=[])


def test_an_effect_carries_both_runs_and_its_target():
    clean = synthetic((30,), secondary=())
    intervened = synthetic((30,), secondary=(12,), seed=1)
    effect = SimpleNamespace(clean=clean, intervened=intervened, spec="isolate:layers=0-3,queries=12", metadata={},
                             target=SimpleNamespace(to_dict=lambda: {"layers": [0, 1], "positions": [12], "rule": "r"}),
                             summary={"target_sink_score": {"clean": 0.01, "intervened": 0.2, "delta": 0.19}})
    data = view_data(effect)
    assert data["kind"] == "effect" and data["runs"] == ["clean", "intervened"]
    assert data["target"]["positions"] == [12] and data["effect"]["spec"] == effect.spec
    seq = data["sequences"][0]
    assert seq["secondary"]["clean"] == [] and seq["secondary"]["intervened"][0]["position"] == 12
    assert set(seq["score"]) == {"clean", "intervened"}


def test_only_measurements_and_effects_have_a_view():
    with pytest.raises(ViewError, match="not dict"):
        view({})
    with pytest.raises(ViewError, match="eps must be a number strictly between 0 and 1"):
        view(synthetic((8,)), eps=1.5)


def test_jupyter_shows_the_page_in_a_sandboxed_iframe():
    v = view(synthetic((12,)))
    assert isinstance(v, View)
    frame = v._repr_html_()
    assert frame.startswith("<iframe srcdoc=") and 'sandbox="allow-scripts"' in frame
    srcdoc = re.search(r'srcdoc="([^"]*)"', frame).group(1)
    assert html.unescape(srcdoc) == v.html


def test_measure_writes_the_view_inside_its_atomic_output(tmp_path):
    out = tmp_path / "out"
    assert main(["measure", "--model", "tiny-llama", "--text", "a b c d e f", "--out", str(out)]) == 0
    page = (out / "view.html").read_text(encoding="utf-8")
    doc = json.loads((out / "sinks.json").read_text())
    data = embedded(page)
    assert data["sequences"][0]["tokens"] == doc["tokens"][0]
    shown = np.array(data["sequences"][0]["score"]["measurement"], dtype=float)
    np.testing.assert_allclose(shown, np.array(doc["sink_score"], dtype=float), rtol=5e-4)
    assert "view.html" in json.loads((out / MANIFEST).read_text())["files"]


def test_intervene_writes_the_effect_view(tmp_path):
    out = tmp_path / "out"
    argv = ["intervene", "--model", "tiny-llama", "--intervention", "ablate-mlp:layers=1,positions=3", "--text", "a b c d e f",
            "--n-resamples", "0", "--out", str(out)]
    assert main(argv) == 0
    data = embedded((out / "view.html").read_text(encoding="utf-8"))
    assert data["kind"] == "effect" and data["effect"]["spec"] == "ablate-mlp:layers=1,positions=3"
    assert "view.html" in json.loads((out / MANIFEST).read_text())["files"]


def test_ipython_displays_a_view_as_html():
    from IPython.core.interactiveshell import InteractiveShell  # the dev extra's IPython, as a notebook kernel uses it

    shown, _ = InteractiveShell.instance().display_formatter.format(view(synthetic((12,))))
    assert shown["text/html"].startswith("<iframe srcdoc=") and shown["text/plain"].startswith("View('synthetic: attention sinks'")
