"""What the command reads: prompt files in four formats (counted and named every time), the
options it refuses before any work, and a parser that answers without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from circuits.probes import PromptsFileError, read_prompts
from helpers import ROOT, expect_bad_input, heavy_modules_after
from sinkscope.cli import main

# --------------------------------------------------------------------------- prompt files


def _file(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("name, content, expected, fmt", [
    ("p.txt", "first prompt\nstill first\n\nsecond prompt\n", ["first prompt\nstill first", "second prompt"], "paragraphs"),
    ("p.txt", "only one prompt on one line\n", ["only one prompt on one line"], "paragraphs"),
    ("p.txt", "one\n \t\ntwo\r\n\r\nthree", ["one", "two", "three"], "paragraphs"),
    ("p.json", '["a b", "c d"]', ["a b", "c d"], "json"),
    ("p.json", '[{"text": "a b"}, {"text": "c d", "id": 3}]', ["a b", "c d"], "json"),
    ("p.jsonl", '{"text": "a b"}\n\n{"text": "c d", "meta": 1}\n', ["a b", "c d"], "jsonl"),
    ("prompts", '["no extension", "but valid JSON"]', ["no extension", "but valid JSON"], "json"),
    ("prompts", '{"text": "x y"}\n{"text": "z w"}\n', ["x y", "z w"], "jsonl"),
    ("prompts", "[citation needed] is plain text\n\nand so is this", ["[citation needed] is plain text", "and so is this"],
     "paragraphs"),
    ("p.txt", '["looks like JSON"]\n\nbut a .txt file is text', ['["looks like JSON"]', "but a .txt file is text"], "paragraphs"),
    ("p.json", b'\xef\xbb\xbf["with a BOM"]', ["with a BOM"], "json"),
])
def test_prompt_formats_are_picked_from_extension_and_content(tmp_path, name, content, expected, fmt):
    assert read_prompts(_file(tmp_path, name, content)) == (expected, fmt)


def test_one_prompt_per_line_needs_the_format_named_and_is_never_read_as_one_prompt(tmp_path):
    path = _file(tmp_path, "p.txt", "first prompt\nsecond prompt\nthird prompt\n")
    with pytest.raises(PromptsFileError, match="3 lines and no blank line.*--prompts-format lines"):
        read_prompts(path)
    assert read_prompts(path, "lines") == (["first prompt", "second prompt", "third prompt"], "lines")
    assert read_prompts(path, "paragraphs") == (["first prompt\nsecond prompt\nthird prompt"], "paragraphs")


@pytest.mark.parametrize("name, content, message", [
    ("p.json", '{"prompts": ["a"]}', "holds a JSON object, not a list"),
    ("p.json", '"one string"', "holds a JSON str, not a list"),
    ("p.json", '["ok", 3]', "item 1: each prompt must be a string"),
    ("p.json", '["unterminated', "is not valid JSON"),
    ("p.jsonl", '{"text": "ok"}\n{"title": "no text"}\n', "line 2: each prompt must be a string or an object with a string 'text'"),
    ("p.jsonl", '{"text": "ok"}\nnot json\n', "line 2: not valid JSON"),
    ("p.txt", "\n \n", "holds no text"),
])
def test_broken_prompt_files_name_the_problem(tmp_path, name, content, message):
    with pytest.raises(PromptsFileError, match=message):
        read_prompts(_file(tmp_path, name, content))


def test_the_command_says_how_many_prompts_it_read_and_how(tmp_path, capsys):
    path = _file(tmp_path, "p.txt", "the first prompt here\nthe second prompt here\n")
    code = main(["measure", "--model", "tiny-llama", "--prompts", str(path), "--prompts-format", "lines",
                 "--out", str(tmp_path / "o")])
    assert code == 0
    out = capsys.readouterr().out
    assert f"read 2 prompts from {path} (lines)" in out
    assert json.loads((tmp_path / "o" / "sinks.json").read_text())["n_sequences"] == 2


@pytest.mark.parametrize("content, message", [
    ("a\nb\nc\n", "--prompts-format lines"),
    ('{"prompts": ["a"]}', "not a list"),
])
def test_an_ambiguous_or_wrong_prompts_file_is_one_line(tmp_path, capsys, content, message):
    path = _file(tmp_path, "p.json" if content.startswith("{") else "p.txt", content)
    assert message in expect_bad_input(capsys, tmp_path, ["measure", "--model", "tiny-llama", "--prompts", str(path)])


# --------------------------------------------------------------------------- one sequence: no CI


def test_one_sequence_says_a_ci_needs_two_instead_of_nan(tmp_path, capsys):
    assert main(["measure", "--model", "tiny-llama", "--text", "only one text here", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "no CI: a confidence interval needs at least two sequences" in out and "nan" not in out
    first = json.loads((tmp_path / "o" / "sinks.json").read_text())["sink_rate"]["first_token"]
    assert first["ci95"] is None and first["ci95_note"] == "a confidence interval needs at least two sequences"


def test_two_sequences_get_a_ci(tmp_path, capsys):
    assert main(["measure", "--model", "tiny-llama", "--text", "one text", "another text", "--out", str(tmp_path / "o")]) == 0
    assert "95 % CI" in capsys.readouterr().out
    first = json.loads((tmp_path / "o" / "sinks.json").read_text())["sink_rate"]["first_token"]
    assert len(first["ci95"]) == 2 and "ci95_note" not in first


def test_intervene_on_one_sequence_says_why_there_is_no_ci(tmp_path, capsys):
    code = main(["intervene", "--model", "tiny-llama", "--intervention", "ablate-mlp:layer=1,positions=3",
                 "--text", "only one text here", "--n-resamples", "100", "--out", str(tmp_path / "o")])
    assert code == 0
    out = capsys.readouterr().out
    assert "no CI: an effect's confidence interval needs at least 3 sequences (got 1)" in out and "nan" not in out
    assert json.loads((tmp_path / "o" / "effect.json").read_text())["ci95_note"].startswith("an effect's confidence interval needs")


@pytest.mark.parametrize("texts, resamples, note", [
    (["a b c d e f g h i", "j k l m n o p q r"], "50", "needs at least 3 sequences (got 2)"),
    (["a b c d e f g h i", "j k l m n o p q r", "s t u v w x y z a"], "0", "confidence intervals switched off (--n-resamples 0)"),
])
def test_intervene_says_why_an_effect_has_no_ci_never_nan(tmp_path, capsys, texts, resamples, note):
    code = main(["intervene", "--model", "tiny-llama", "--intervention", "ablate-mlp:layer=1,positions=3",
                 "--text", *texts, "--n-resamples", resamples, "--out", str(tmp_path / "o")])
    assert code == 0
    out = capsys.readouterr().out
    assert note in out and "nan" not in out
    assert note in json.loads((tmp_path / "o" / "effect.json").read_text())["ci95_note"]


# --------------------------------------------------------------------------- options refused before any work


@pytest.mark.parametrize("command", ["measure", "intervene"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_batch_size_must_be_positive(tmp_path, capsys, command, value):
    extra = ["--intervention", "ablate-mlp:layers=1"] if command == "intervene" else []
    msg = expect_bad_input(capsys, tmp_path, [command, "--model", "tiny-llama", "--text", "a b c", *extra, "--batch-size", value])
    assert "--batch-size must be a positive integer" in msg


@pytest.mark.parametrize("value", ["nan", "0", "1", "1.5", "-0.1", "inf"])
def test_demo_eps_outside_zero_one_or_nan_is_refused(tmp_path, capsys, value):
    msg = expect_bad_input(capsys, tmp_path, ["demo", "--model", "tiny-llama", "--eps", value])
    assert "--eps must be a number strictly between 0 and 1" in msg


def test_max_tokens_above_the_context_says_the_limit(tmp_path, capsys):
    msg = expect_bad_input(capsys, tmp_path, ["measure", "--model", "tiny-llama", "--text", "a b c", "--max-tokens", "500"])
    assert "--max-tokens must be <= 128" in msg
    msg = expect_bad_input(capsys, tmp_path, ["demo", "--model", "tiny-llama", "--max-tokens", "1"])
    assert "max_tokens must be at least 2" in msg


def test_text_longer_than_the_context_names_the_option_and_its_limit(tmp_path, capsys):
    msg = expect_bad_input(capsys, tmp_path, ["measure", "--model", "tiny-llama", "--text", "x" * 400])
    assert "more than the model's context of 128" in msg and "--max-tokens) <= 128" in msg


def test_reproduce_with_a_missing_checkpoints_folder(tmp_path, capsys):
    msg = expect_bad_input(capsys, tmp_path, ["reproduce", "--model", "tiny-llama", "--size", "ci",
                                              "--checkpoints", str(tmp_path / "no-such-folder")])
    assert "--checkpoints" in msg and "no such folder" in msg


def test_lab_compare_refuses_a_negative_seed_before_any_work(tmp_path, capsys):
    msg = expect_bad_input(capsys, tmp_path, ["lab-compare", "--corpus", "builtin", "--steps", "2", "--seeds", "0", "-1"])
    assert "--seeds must be non-negative integers, got -1" in msg
    assert list(tmp_path.iterdir()) == []


def test_pretrain_refuses_a_bad_config_before_any_work(tmp_path, capsys):
    msg = expect_bad_input(capsys, tmp_path, ["pretrain", "--variant", "softmax", "--steps", "0", "--corpus", "builtin"])
    assert "steps must be positive" in msg
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- a light parser


def test_building_the_parser_imports_neither_torch_nor_transformers():
    assert heavy_modules_after("from sinkscope.cli import build_parser; build_parser()") == []


@pytest.mark.parametrize("args", [["--help"], ["pretrain", "--help"], ["measure", "--eps", "x"], ["nosuchcommand"]])
def test_help_and_argument_errors_never_import_torch(args):
    """Why help and argument errors answer at once: they are answered before torch, transformers,
    TransformerLens or pandas is imported. Proved by making those imports fail in the process
    (the seconds it takes are a benchmark figure, not a test: a loaded machine may be slow)."""
    code = ("import sys; [sys.modules.__setitem__(m, None) for m in ('torch', 'transformers', 'transformer_lens', 'pandas')]; "
            "from sinkscope.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == (0 if "--help" in args else 2), proc.stderr
    assert "Traceback" not in proc.stderr and "ModuleNotFoundError" not in proc.stderr
    if "--help" not in args:
        assert len(proc.stderr.strip().splitlines()) >= 1 and "sinkscope" in proc.stderr
