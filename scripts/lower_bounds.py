"""Print pip constraints that pin every runtime dependency of pyproject.toml to its lower bound.

``.ci/run`` installs sinkscope with these constraints into a fresh environment and runs the
quick tier there, so each ``>=`` in ``pyproject.toml`` is a version that was installed and
tested, not a guess. Dependencies without a lower bound are left to the resolver.

    python scripts/lower_bounds.py > lower.txt && pip install -c lower.txt .
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def lower_bounds(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """``name==version`` for every dependency with a ``>=`` bound, in the file's order."""
    deps = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    out = []
    for dep in map(Requirement, deps):
        lows = [spec.version for spec in dep.specifier if spec.operator == ">="]
        if lows:
            out.append(f"{dep.name}=={lows[0]}")
    return out


if __name__ == "__main__":
    sys.stdout.write("".join(line + "\n" for line in lower_bounds()))
