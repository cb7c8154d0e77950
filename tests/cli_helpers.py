"""Shared assertion for the CLI's bad-input contract (imported by the CLI tests)."""

from __future__ import annotations

from pathlib import Path

from sinkscope.cli import main


def expect_bad_input(capsys, tmp_path: Path, argv: list[str]) -> str:
    """Run ``sinkscope argv --out tmp_path/out``: exit 2, one stderr line, nothing written."""
    out = tmp_path / "out"
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("sinkscope: error: "), err
    assert "Traceback" not in err[0]
    assert not out.exists(), "nothing may be written on bad input"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no staging folder left"
    return err[0]
