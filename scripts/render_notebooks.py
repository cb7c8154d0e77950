"""Execute the notebooks and write the rendered copies, with their outputs, to docs/notebooks/.

``make notebooks`` runs this. The source notebooks in ``notebooks/`` stay output-free (clean
diffs); their executed copies under ``docs/notebooks/`` show the figures, tables and the
interactive view to a reader who runs nothing. Each notebook runs top to bottom in a fresh
``python3`` kernel (the venv's, installed by ``make install-dev``) on the packaged models, at
the size the notebook itself sets (the CI size of ``sinkscope reproduce``: ``SIZES["ci"]``).

The kernel inherits this process's environment, so backend and threads are set from outside,
never inside a notebook: ``MPLBACKEND``, ``OMP_NUM_THREADS`` (torch reads it at import), ... .
``tests/test_notebooks.py`` runs the notebooks through :func:`execute` with ``MPLBACKEND=Agg``.

    python scripts/render_notebooks.py [NAME ...]     # default: every notebook
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "notebooks"
RENDERED = ROOT / "docs" / "notebooks"
CELL_TIMEOUT = 1800  # seconds per cell: generous, the machine may be shared
#: set for every kernel unless the caller's environment says otherwise: no tokenizer fork warnings and no
#: "IProgress not found" (tqdm without ipywidgets) in the outputs
DEFAULT_ENV = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore:IProgress not found"}


def kernel_name() -> str:
    """``python3`` when that kernelspec runs this interpreter (``make install-dev`` installs it
    into the venv); otherwise a kernelspec for this interpreter, installed into its prefix."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        if Path(spec.argv[0]).resolve() == Path(sys.executable).resolve():
            return "python3"
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(prefix=sys.prefix, kernel_name="sinkscope-test")
    return "sinkscope-test"


def execute(path: Path, workdir: Path, env: dict[str, str] | None = None):
    """Run the notebook at ``path`` in a fresh kernel whose working directory is ``workdir``;
    return the executed notebook (raises ``CellExecutionError`` naming the failing cell).
    ``env`` is added to this process's environment for the kernel only."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=kernel_name(), resources={"metadata": {"path": str(workdir)}},
                            allow_errors=False, record_timing=False)
    kernel_env = {**DEFAULT_ENV, **os.environ, **(env or {})}
    client.execute(env=kernel_env)
    return nb


def render(path: Path, out_dir: Path = RENDERED) -> Path:
    """Execute ``path`` (working directory: a fresh temporary folder) and write the executed copy
    to ``out_dir`` under the same name."""
    import nbformat

    with tempfile.TemporaryDirectory(prefix=f"render-{path.stem}-") as tmp:
        nb = execute(path, Path(tmp))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    nbformat.write(nb, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names (stem or file name); default: all of notebooks/")
    args = parser.parse_args(argv)
    paths = sorted(SOURCES.glob("*.ipynb"))
    if args.names:
        wanted = {Path(n).stem for n in args.names}
        unknown = wanted - {p.stem for p in paths}
        if unknown:
            parser.error(f"no such notebook: {', '.join(sorted(unknown))}")
        paths = [p for p in paths if p.stem in wanted]
    for path in paths:
        t0 = time.perf_counter()
        out = render(path)
        print(f"{path.name}: {time.perf_counter() - t0:.0f} s -> {out.relative_to(ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
