"""Helpers shared by the tests: the CLI's bad-input contract and a forward-pass counter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

from sinkscope.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: int = 300, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    """The real console entry point, in a subprocess (exit code and stderr as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "sinkscope.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}, **popen,
    )


def heavy_modules_after(code: str, modules=("torch", "transformers", "transformer_lens", "pandas")) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after running ``code``."""
    probe = f"import sys\n{code}\nprint(sorted(m for m in {tuple(modules)!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return eval(proc.stdout.strip())  # a printed list of str


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


def expect_bad_out(capsys, argv: list[str], out: Path) -> str:
    """Run ``sinkscope argv --out out`` where ``out`` cannot be used: exit 2, one line, out unchanged."""
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.is_dir() else None
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("sinkscope: error: "), err
    if before is not None:
        assert sorted(p.name for p in out.parent.iterdir()) == before, "nothing may be written next to --out"
    return err[0]


def waiters_on(folder: Path) -> list[int]:
    """Processes blocked waiting for a ``flock`` on ``folder`` (the ``->`` lines of Linux'
    /proc/locks): how a concurrency test proves that two processes overlapped."""
    st = os.stat(folder)
    pids = []
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if len(parts) > 6 and parts[1] == "->" and parts[2] == "FLOCK":
            major, minor, inode = parts[6].split(":")
            if int(inode) == st.st_ino and (int(major, 16), int(minor, 16)) == (os.major(st.st_dev), os.minor(st.st_dev)):
                pids.append(int(parts[5]))
    return pids


def hanging_measure(out: Path, *, slow_cleanup: bool = False) -> subprocess.Popen:
    """``sinkscope measure`` (the console entry point) stopped inside its staging folder; with
    ``slow_cleanup`` its clean-up announces itself and takes a second."""
    script = f"""
        import sys, time, shutil
        import circuits.output as output
        import sinkscope.jobs as jobs
        def hang(*a, **k):
            print("writing", flush=True)
            time.sleep(120)
        jobs.write_figures = hang
        if {slow_cleanup}:
            real = shutil.rmtree
            def slow(path, *a, **k):
                print("cleaning", flush=True)
                time.sleep(1.0)
                return real(path, *a, **k)
            output.shutil.rmtree = slow
        from sinkscope.cli import main
        sys.argv = ["sinkscope", "measure", "--model", "tiny-llama", "--text", "a b c d", "--out", sys.argv[1]]
        sys.exit(main())
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    assert [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.staging-")]
    return proc


class Interrupt(Exception):
    """Raised by :func:`forward_counter` to simulate an interruption."""


@contextmanager
def forward_counter(model, raise_at: int | None = None):
    """Counts ``model.forward`` calls (run_with_hooks, __call__ and run_from_layer all go
    through it); raises :class:`Interrupt` on call number ``raise_at``."""
    calls = []
    original = model.forward

    def counting(*args, **kwargs):
        calls.append(1)
        if raise_at is not None and len(calls) == raise_at:
            raise Interrupt
        return original(*args, **kwargs)

    model.forward = counting
    try:
        yield calls
    finally:
        del model.forward


def load_script(name: str):
    """A script of ``scripts/`` (not a package) imported by path, for tests of its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
