"""The notebooks: they run top to bottom, headless, and their rendered copies match them.

Notebooks are recipes and paper reproductions on CI-sized settings; executing them here keeps
them in step with the library. They are found by glob, so a new notebook is tested as soon as
it is added. They run through ``scripts/render_notebooks.py`` (what ``make notebooks`` runs) in
a ``python3`` kernel, as installed into the venv by ``make install-dev`` (or the running
interpreter's own kernel when that kernelspec is missing).

Nothing test-specific lives inside a notebook: the harness sets the matplotlib backend
(``MPLBACKEND=Agg``) in the kernel's environment, and the kernel inherits every other setting of
this process's, e.g. ``OMP_NUM_THREADS`` for torch's threads. ``SINKSCOPE_NOTEBOOK_MODEL=NAME``
runs every notebook on another packaged model by changing its ``MODEL`` line, as a reader would.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from helpers import load_script

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
RENDERED = ROOT / "docs" / "notebooks"
MODEL_LINE = re.compile(r'^MODEL = "([^"]+)"', re.M)
PACKAGED = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")


def _render_module():
    return load_script("render_notebooks")


def _read(path):
    import nbformat

    return nbformat.read(path, as_version=4)


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_notebooks_exist():
    names = {p.stem for p in NOTEBOOKS}
    assert {"wong_secondary_sinks", "li_structural_origin", "gu_when_sinks_emerge"} <= names


def test_committed_notebooks_have_no_outputs():
    for path in NOTEBOOKS:
        nb = _read(path)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))]
        assert not dirty, f"{path.name}: cells {dirty} hold outputs; strip them before committing"


def test_no_test_machine_settings_inside_a_notebook():
    """Threads and the plotting backend are the harness's business (its environment), not the
    reader's: copied into a session, they would slow the run and switch off inline plots."""
    for path in NOTEBOOKS:
        for src in _code(_read(path)):
            for bad in ("set_num_threads", "matplotlib.use(", "MPLBACKEND", "OMP_NUM_THREADS"):
                assert bad not in src, f"{path.name}: {bad} inside a notebook; set it from outside (tests/test_notebooks.py)"


def test_one_variable_picks_the_model():
    """A notebook that loads a packaged model names it once, in ``MODEL = "..."`` in its first
    code cell, and nowhere else in its code (changing that line runs it on another model)."""
    for path in NOTEBOOKS:
        code = _code(_read(path))
        if not any("load_model(MODEL)" in src for src in code):
            assert not any(name in src for src in code for name in PACKAGED), f"{path.name} loads a packaged model without MODEL"
            continue
        assert MODEL_LINE.search(code[0]), f"{path.name}: its first code cell does not set MODEL"
        rest = [MODEL_LINE.sub("", src) for src in code]
        rest = [re.sub(r"#.*", "", src) for src in rest]  # comments may name the alternatives
        named = [name for src in rest for name in PACKAGED if f'"{name}"' in src]
        assert not named, f"{path.name}: the model is named outside its MODEL line: {named}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_rendered_copy_matches_source(path):
    """docs/notebooks/ holds an executed copy of every notebook (``make notebooks``); its cells
    must be the source's, so what a reader sees there is what the notebook runs."""
    rendered = RENDERED / path.name
    assert rendered.is_file(), f"no rendered copy {rendered.relative_to(ROOT)}: run `make notebooks`"
    src, out = _read(path), _read(rendered)
    pairs = [(c.cell_type, c.source) for c in src.cells]
    assert pairs == [(c.cell_type, c.source) for c in out.cells], (
        f"{rendered.relative_to(ROOT)} no longer matches {path.relative_to(ROOT)}: run `make notebooks` and commit docs/notebooks/")
    code = [c for c in out.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{rendered.name}: a code cell was not executed"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{rendered.name} holds an error output"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    render = _render_module()
    run = path
    model = os.environ.get("SINKSCOPE_NOTEBOOK_MODEL")
    if model:
        nb = _read(path)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.source = MODEL_LINE.sub(f'MODEL = "{model}"', cell.source)
        run = tmp_path / path.name
        import nbformat

        nbformat.write(nb, run)
    nb = render.execute(run, tmp_path, env={"MPLBACKEND": "Agg"})  # raises CellExecutionError naming the cell
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
