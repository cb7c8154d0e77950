"""Every code example of README.md and the documentation site (docs/*.md) runs.

A page's ```python blocks run in order in one namespace (as a reader would type them into one
session) and its ```sh blocks run in bash with ``set -euo pipefail``, all in one temporary folder,
so a block may read what an earlier one wrote (``prompts.txt``, ``sinks-out/``). The ``sinkscope``
of this environment is first on ``PATH``. Other fences (``text``, ``json``, ...) are not run.

A block that cannot run here says so on its first line, visibly: ``# not run in the tests: why``
(a 32k-token trace, a 14B hub model, CUDA); the collector skips it and reports the reason. A
page whose runnable blocks load a packaged model is marked ``real`` (the quick tier
``-m "not real"`` stays model-free), and a page that takes longer than ~30 s is marked ``slow``.

Also checked here, without running anything: every relative link of README.md and the pages
points at a file that exists (GitHub resolves them too), and the API reference
(docs/api.md) names every module of the three packages.
"""

from __future__ import annotations

import os
import pkgutil
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import ROOT

#: pages whose examples are read; the generated reports (docs/reproduce-*.md, docs/lab/report.md) hold none
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python", "sh"}
NOT_RUN = re.compile(r"^#\s*not run in the tests:\s*(\S.*)$")
PACKAGED = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")
#: a runnable block that loads a packaged model: load_model("..."), --model ..., MODEL = "..."
LOADS_PACKAGED = re.compile(r"""(load_model\(\s*["']|--model\s+|MODEL\s*=\s*["'])(%s)""" % "|".join(map(re.escape, PACKAGED)))
#: pages whose examples take more than ~30 s on two cores (measured; the slowest first)
SLOW = {"interventions.md", "results.md", "command.md"}
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    source: str

    @property
    def skip_reason(self) -> str | None:
        first = self.source.lstrip("\n").split("\n", 1)[0].strip()
        match = NOT_RUN.match(first)
        return match.group(1) if match else None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page (CommonMark fences; MyST directives are fences
    too, with ``{name}`` as their info string, and are not code)."""
    found, lines, i = [], page.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, info, start = match["fence"], match["info"].strip(), i
        body = []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and set(lines[i].strip()) == {fence[0]}):
            body.append(lines[i])
            i += 1
        i += 1
        lang = info.split()[0] if info else ""
        found.append(Block(page, start + 1, lang, "\n".join(body) + "\n"))
    return found


def runnable(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.lang in RUN]


def _page_params():
    params = []
    for page in PAGES:
        code = runnable(page)
        if not code:
            continue
        marks = []
        if any(LOADS_PACKAGED.search(b.source) for b in code if b.skip_reason is None):
            marks.append(pytest.mark.real)
        if page.name in SLOW:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(page, marks=marks, id=str(page.relative_to(ROOT))))
    return params


def _run_sh(block: Block, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.source], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"{block.where}: the sh block exited {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n"
                    f"--- stderr\n{done.stderr[-3000:]}", pytrace=False)


def _run_python(block: Block, namespace: dict) -> None:
    code = compile(block.source, block.where, "exec")
    exec(code, namespace)  # noqa: S102 - the documentation's own examples


@pytest.mark.parametrize("page", _page_params())
def test_examples_run(page, tmp_path, monkeypatch, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from interventions import registry

    monkeypatch.chdir(tmp_path)
    kinds = set(registry.known_kinds())  # the built-in kinds, loaded
    module = types.ModuleType("docs_examples")  # a real module: dataclasses defined in a block look theirs up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    skipped = []
    try:
        for block in runnable(page):
            if block.skip_reason is not None:
                skipped.append(f"{block.where}: {block.skip_reason}")
                continue
            if block.lang == "python":
                _run_python(block, namespace)
            else:
                _run_sh(block, tmp_path)
    finally:
        for kind in set(registry.KINDS) - kinds:
            registry.unregister(kind)  # a kind a page registered does not outlive it
        plt.close("all")
    if skipped:
        print("not run:", *skipped, sep="\n  ")


def test_every_not_run_block_gives_a_reason():
    for page in PAGES:
        for block in runnable(page):
            first = block.source.lstrip("\n").split("\n", 1)[0]
            if "not run" in first.lower():
                assert block.skip_reason, f"{block.where}: write '# not run in the tests: <why>' on the block's first line"


def test_the_collector_finds_fences_and_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n````md\n```python\nnot a block\n```\n````\n\n"
                    "```sh\n# not run in the tests: needs a GPU\nsinkscope measure --device cuda\n```\n\n```{note}\nhi\n```\n")
    found = blocks(page)
    assert [(b.lang, b.line) for b in found] == [("python", 3), ("md", 7), ("sh", 13), ("{note}", 18)]
    assert found[2].skip_reason == "needs a GPU" and found[0].skip_reason is None


# ------------------------------------------------------------------------------ links


LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"|<iframe [^>]*src=\"([^\"]+)\"")


@pytest.mark.parametrize("page", [pytest.param(p, id=str(p.relative_to(ROOT))) for p in PAGES])
def test_relative_links_resolve(page):
    """A link to a file of the repository points at one (README's links resolve on GitHub too)."""
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code are examples, not links
    broken = []
    for match in LINK.finditer(text):
        target = next(g for g in match.groups() if g)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor of the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_the_api_reference_names_every_module():
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\s+((?:circuits|interventions|sinkscope)(?:\.\w+)+)\s*$", api, flags=re.M))
    listed |= set(re.findall(r"automodule:: ([\w.]+)", api))
    modules = set()
    for package in ("circuits", "interventions", "sinkscope"):
        path = ROOT / package
        modules |= {m.name for m in pkgutil.walk_packages([str(path)], prefix=f"{package}.")}
    missing = sorted(m for m in modules if m not in listed)
    assert not missing, f"docs/api.md does not list {missing}"
