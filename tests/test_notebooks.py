"""Every notebook in notebooks/ runs top to bottom, headless, without an error.

Notebooks are recipes and paper reproductions on CI-sized settings; executing them here keeps
them in step with the library. They are found by glob, so a new notebook is tested as soon as
it is added. The kernel is ``python3`` as installed into the venv by ``make install-dev``; if
that kernelspec is missing, the test falls back to the running interpreter's own kernel.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 1800  # seconds per cell: generous, the machine may be shared


def _kernel_name() -> str:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        if Path(spec.argv[0]).resolve() == Path(sys.executable).resolve():
            return "python3"
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    prefix = Path(sys.prefix)
    install(prefix=str(prefix), kernel_name="sinkscope-test")
    return "sinkscope-test"


def test_notebooks_exist():
    names = {p.stem for p in NOTEBOOKS}
    assert {"wong_secondary_sinks", "li_structural_origin", "gu_when_sinks_emerge"} <= names


def test_committed_notebooks_have_no_outputs():
    import nbformat

    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))]
        assert not dirty, f"{path.name}: cells {dirty} hold outputs; strip them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env = {"TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    os.environ.update({k: os.environ.get(k, v) for k, v in env.items()})
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name=_kernel_name(), resources={"metadata": {"path": str(tmp_path)}},
        allow_errors=False,
    )
    client.execute()  # raises CellExecutionError naming the cell and its traceback
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
