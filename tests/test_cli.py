"""The CLI: bad input gets one line and exit code 2, good input writes sinks.json and figures atomically."""

from __future__ import annotations

import json

import pytest

from helpers import expect_bad_input, run_cli
from sinkscope.cli import main


def _bad(tmp_path, capsys, *args):
    return expect_bad_input(capsys, tmp_path, list(args))


def test_empty_text(tmp_path, capsys):
    assert "text 0 is empty" in _bad(tmp_path, capsys, "measure", "--model", "tiny-llama", "--text", "  ")


def test_text_longer_than_context(tmp_path, capsys):
    msg = _bad(tmp_path, capsys, "measure", "--model", "tiny-llama", "--text", "x" * 400)
    assert "more than the model's context of 128" in msg


@pytest.mark.parametrize("value", ["0", "-3", "1"])
def test_max_tokens_below_two_is_refused_a_sink_needs_later_queries(tmp_path, capsys, value):
    assert "max_tokens must be at least 2" in _bad(tmp_path, capsys, "measure", "--model", "tiny-llama", "--text", "hi", "--max-tokens", value)


def test_misspelt_model_name(tmp_path, capsys):
    msg = _bad(tmp_path, capsys, "measure", "--model", "smolm2-135m", "--text", "hi")
    assert "unknown model 'smolm2-135m'" in msg and "smollm2-135m" in msg


@pytest.mark.parametrize("command", ["measure", "demo", "intervene", "reproduce"])
def test_a_dtype_or_device_that_does_not_exist_here_is_one_line(tmp_path, capsys, command):
    extra = {"measure": ["--text", "a b c d"], "demo": [],
             "intervene": ["--text", "a b c d e f", "--intervention", "ablate-mlp:layers=1"],
             "reproduce": ["--size", "ci"]}[command]
    msg = _bad(tmp_path, capsys, command, "--model", "tiny-llama", "--dtype", "float8", *extra)
    assert "unknown dtype 'float8'; choose one of float32, bfloat16, float16" in msg
    if not __import__("torch").cuda.is_available():
        msg = _bad(tmp_path, capsys, command, "--model", "tiny-llama", "--device", "cuda", *extra)
        assert "no CUDA GPU is visible here" in msg


def test_measure_in_bfloat16_records_the_dtype(tmp_path, capsys):
    assert main(["measure", "--model", "tiny-llama", "--dtype", "bfloat16", "--text", "a b c d e f g", "--out", str(tmp_path / "o")]) == 0
    doc = json.loads((tmp_path / "o" / "sinks.json").read_text())
    assert doc["metadata"]["dtype"] == "torch.bfloat16"


def test_unreadable_prompts_file(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert "cannot read prompts file" in _bad(tmp_path, capsys, "measure", "--model", "tiny-llama", "--prompts", str(missing))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    assert "cannot read prompts file" in _bad(tmp_path, capsys, "measure", "--model", "tiny-llama", "--prompts", str(binary))


def test_argument_errors_are_one_line_too(tmp_path, capsys):
    assert "--max-tokens" in _bad(tmp_path, capsys, "measure", "--model", "tiny-llama", "--text", "hi", "--max-tokens", "many")
    assert "--eps" in _bad(tmp_path, capsys, "measure", "--model", "tiny-llama", "--text", "hi", "--eps", "1.5")


def test_subprocess_exit_code_and_single_stderr_line(tmp_path):
    proc = run_cli("measure", "--model", "nosuchmodel", "--text", "hi", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("sinkscope: error: unknown model")


def test_measure_writes_the_documented_schema(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["measure", "--model", "tiny-gemma3", "--text", "A first short text here.", "And a second, longer text that pads the first one.",
                 "--prepend-bos", "--out", str(out)])
    assert code == 0
    doc = json.loads((out / "sinks.json").read_text())
    for key in ("model", "prepend_bos", "token_ids", "tokens", "alpha", "sink_rate", "secondary", "versions"):
        assert key in doc
    assert doc["model"] == "tiny-gemma3" and doc["prepend_bos"] is True
    assert [ids[0] for ids in doc["token_ids"]] == [256, 256]  # BOS first, as asked
    n_layers, n_heads, width = 4, 4, max(len(t) for t in doc["token_ids"])
    assert len(doc["alpha"]) == n_layers and len(doc["alpha"][0]) == n_heads and len(doc["alpha"][0][0]) == width
    assert doc["sink_rate"]["eps"] == 0.3 and len(doc["sink_rate"]["per_position"]) == width
    assert set(doc["versions"]) == {"torch", "transformers", "transformer-lens", "sinkscope"}
    for row in doc["secondary"]:
        assert {"sequence", "position", "token", "start_layer", "lifetime", "kind", "peak_score"} <= set(row)
    for png in ("sink_score_heatmap.png", "primary_sink_mass.png", "secondary_sinks.png"):
        assert (out / png).stat().st_size > 1000


def test_failure_mid_job_leaves_previous_output_untouched(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["measure", "--model", "tiny-llama", "--text", "first run", "--out", str(out)]) == 0
    before = (out / "sinks.json").read_bytes()
    import sinkscope.jobs as jobs

    def explode(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(jobs, "write_figures", explode)
    with pytest.raises(RuntimeError):
        main(["measure", "--model", "tiny-llama", "--text", "second run", "--out", str(out)])
    assert (out / "sinks.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_models_lists_names_and_offline_status(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma3-270m" in out and "ready offline" in out
