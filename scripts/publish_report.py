"""Publish a ``sinkscope reproduce`` output folder as the committed report of its model.

Why a script: the committed reports live in ``docs/`` (``docs/reproduce-<model>.md``, its PNGs
and ``numbers.json`` under ``docs/figures/<model>/``), with the report's relative image links
rewritten to that folder. Doing it by hand once put a figure of one run next to the text of
another. The old figures are removed first, so nothing of an earlier run survives; the verdict
table of the results page (``docs/results.md``) is then regenerated (``scripts/update_verdicts.py``).

    sinkscope reproduce --model qwen2.5-coder-0.5b --out /tmp/rep-qwen
    python scripts/publish_report.py /tmp/rep-qwen

A ``--size long`` run (Wong et al. at 8,192 tokens) is published beside it, as
``docs/reproduce-<model>-long.md`` with ``docs/figures/<model>-long/``; the verdict table reads
the full-size runs only. Other sizes are refused.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([A-Za-z0-9_]+\.(?:png|json))\)")


def publish(folder: Path, root: Path = ROOT) -> Path:
    doc = json.loads((folder / "numbers.json").read_text(encoding="utf-8"))
    if doc.get("size") not in ("full", "long"):
        raise SystemExit(f"{folder} is a {doc.get('size')!r}-size run; only full and long runs are committed")
    model = doc["model"] if doc["size"] == "full" else f"{doc['model']}-long"  # a long run sits beside the full one
    figures = root / "docs" / "figures" / model
    if figures.exists():
        shutil.rmtree(figures)
    figures.mkdir(parents=True)
    for path in [*folder.glob("*.png"), folder / "numbers.json"]:
        shutil.copy2(path, figures / path.name)
    text = (folder / "report.md").read_text(encoding="utf-8")
    target = root / "docs" / f"reproduce-{model}.md"
    target.write_text(LINK.sub(lambda m: f"](figures/{model}/{m.group(1)})", text), encoding="utf-8")
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    print(f"wrote {publish(Path(argv[0]))}")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "update_verdicts.py")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
