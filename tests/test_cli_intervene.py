"""``sinkscope intervene``: writes effect.json and figures; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest

from helpers import expect_bad_input
from sinkscope.cli import main

TEXTS = ["The cat sat on the mat, and then it slept.", "A quick brown fox jumps over the lazy dog!",
         "Sinks store attention that has nowhere to go."]
PNG = b"\x89PNG\r\n\x1a\n"


def _bad(tmp_path, capsys, *args) -> str:
    return expect_bad_input(capsys, tmp_path, ["intervene", "--model", "tiny-llama", *args])


def test_writes_effect_json_and_heatmap(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["intervene", "--model", "tiny-llama", "--intervention", "ablate-mlp:layer=1,positions=4",
                 "--text", *TEXTS, "--n-resamples", "300", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tiny-llama: ablate-mlp:layers=1,positions=4: target sink score" in printed and "effect.json" in printed
    doc = json.loads((out / "effect.json").read_text())
    assert doc["schema"] == "sinkscope.effect/1" and doc["model"] == "tiny-llama"
    assert doc["intervention"] == "ablate-mlp:layers=1,positions=4" and doc["control"] is None
    assert doc["target"] == {"layers": [2, 3], "positions": [4], "rule": doc["target"]["rule"]}
    assert doc["settings"]["n_resamples"] == 300 and len(doc["token_ids"]) == 3
    metrics = {row["metric"] for row in doc["rows"]}
    assert metrics == {"target_sink_score", "next_token_loss", "kl", "sink_rate", "sink_score"}
    heat = out / "sink_delta_heatmap.png"
    assert heat.read_bytes()[:8] == PNG and heat.stat().st_size > 5000
    assert not (out / "dose_response.png").exists()


def test_control_and_dose_response(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["intervene", "--model", "tiny-llama", "--intervention", "amplify-variance:layer=1,positions=4,factor=3",
                 "--control", "random", "--strengths", "0.5", "1", "3", "--text", *TEXTS, "--n-resamples", "300",
                 "--seed", "5", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "effect.json").read_text())
    assert doc["control"]["mode"] == "position" and doc["control"]["seed"] == 5
    assert doc["control"]["spec"].startswith("amplify-variance:layers=1,positions=") and doc["control"]["spec"].endswith("factor=3.0")
    assert "did" in doc["summary"]["target_sink_score"]
    curve = [r for r in doc["dose_response"] if r["metric"] == "target_sink_score"]
    assert [r["iv_strength"] for r in curve] == [0.5, 1.0, 3.0]
    assert curve[1]["delta"] == pytest.approx(0.0, abs=1e-6)  # factor 1 in deviation mode: identity up to rounding
    assert (out / "dose_response.png").read_bytes()[:8] == PNG
    assert (out / "sweep" / "sweep.csv").is_file() and (out / "sweep" / "sweep.json").is_file()


def test_unknown_kind(tmp_path, capsys):
    msg = _bad(tmp_path, capsys, "--intervention", "ablate-everything:layer=1", "--text", "hi there")
    assert "unknown intervention kind 'ablate-everything'" in msg and "ablate-mlp" in msg


def test_layer_out_of_range(tmp_path, capsys):
    msg = _bad(tmp_path, capsys, "--intervention", "ablate-mlp:layer=9", "--text", "hi there")
    assert "layer 9 is out of range" in msg and "4 layers" in msg


def test_nan_strength(tmp_path, capsys):
    msg = _bad(tmp_path, capsys, "--intervention", "amplify-variance:layer=1,positions=2,factor=nan", "--text", "hi there")
    assert "finite" in msg
    msg = _bad(tmp_path, capsys, "--intervention", "amplify-variance:layer=1,positions=2,factor=2", "--strengths", "1", "nan",
               "--text", "hi there")
    assert "--strengths must be a finite number" in msg


def test_other_bad_input(tmp_path, capsys):
    assert "position 40 is out of range" in _bad(tmp_path, capsys, "--intervention", "ablate-mlp:layer=1,positions=40", "--text", "short text")
    assert "has no strength" in _bad(tmp_path, capsys, "--intervention", "ablate-mlp:layer=1", "--strengths", "1", "2", "--text", "hi there")
    assert "names no positions" in _bad(tmp_path, capsys, "--intervention", "ablate-mlp:layer=1", "--control", "position", "--text", *TEXTS)
    assert "--control" in _bad(tmp_path, capsys, "--intervention", "ablate-mlp:layer=1", "--control", "everywhere", "--text", "hi")
    assert "--eps" in _bad(tmp_path, capsys, "--intervention", "ablate-mlp:layer=1", "--eps", "0", "--text", "hi there")
    assert "text 0 is empty" in _bad(tmp_path, capsys, "--intervention", "ablate-mlp:layer=1", "--text", " ")
    assert "--intervention" in _bad(tmp_path, capsys, "--text", "hi there")
