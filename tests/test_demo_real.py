"""The main job on the real default model: the report states what smollm2-135m actually does.

Thresholds come from the run recorded in README.md (100 probe passages × 64 tokens, no BOS):
Sink_1^0.3 = 70.9 % (95 % CI 69.2-72.4); the primary sink holds in layers 3-9 and 12-29 and
vanishes in 0-2 and 10-11; residual dim 507 is massive at position 0 (max |value| ~25,700,
~15,700 × the median); 206 secondary-sink candidates, 189 of them " the".
"""

from __future__ import annotations

import json

import pytest

from sinkscope.jobs import run_demo

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def demo(smollm2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    doc = run_demo(smollm2, folder, n=100, max_tokens=64)
    return folder, doc


def test_probe_set_is_100_natural_sequences_of_64_tokens(demo):
    _, doc = demo
    assert doc["n_sequences"] == 100
    assert all(len(ids) == 64 for ids in doc["token_ids"])
    assert doc["prepend_bos"] is False  # SmolLM2's own tokenizer adds no BOS


def test_first_token_sink_rate(demo):
    _, doc = demo
    rate = doc["sink_rate"]["first_token"]
    assert 60.0 < rate["value"] < 80.0
    assert rate["ci95"][0] <= rate["value"] <= rate["ci95"][1]
    assert doc["sink_rate"]["per_position"][0] == pytest.approx(rate["value"], abs=1e-3)
    assert max(doc["sink_rate"]["per_position"][1:]) < 15.0  # no other position is a sink on average


def test_primary_sink_layers(demo):
    _, doc = demo
    holds = {row["layer"] for row in doc["primary_sink"] if row["holds_sink"]}
    assert set(range(12, 30)) <= holds
    assert not holds & {0, 1, 10, 11}  # the mid-network dip of the primary sink


def test_massive_dimension_507_at_the_first_token(demo):
    _, doc = demo
    dims = {row["dim"]: row for row in doc["massive_dimensions"]}
    assert 507 in dims
    assert dims[507]["max_abs_value"] > 10_000 and dims[507]["max_ratio"] > 5_000
    assert dims[507]["share_at_position_0"] > 0.9


def test_secondary_sinks_are_early_the_tokens(demo):
    _, doc = demo
    sec = [row for row in doc["secondary"] if row["kind"] == "secondary"]
    assert len(sec) >= 100
    the = [row for row in sec if row["token"] == " the"]
    assert len(the) / len(sec) > 0.7
    assert all(row["start_layer"] <= 3 for row in the)
    # they really receive attention: far above the median non-first token at their peak layer
    ratios = sorted(row["score_ratio"] for row in the if row["score_ratio"] is not None)
    assert ratios[len(ratios) // 2] > 10


def test_report_quotes_the_measured_numbers(demo):
    folder, doc = demo
    report = (folder / "report.md").read_text()
    assert f"{doc['sink_rate']['first_token']['value']:.1f} %" in report
    assert "| 507 |" in report
    for png in ("primary_sink_mass.png", "secondary_sinks.png", "sink_score_heatmap.png"):
        assert png in report and (folder / png).exists()
    assert json.loads((folder / "sinks.json").read_text())["model"] == "smollm2-135m"
