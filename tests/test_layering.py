"""The house rule, as a specification: data flows one way, and every deferred import says why.

``circuits/`` (observe) imports nothing from ``interventions/`` (act) or ``sinkscope/`` (the
command, jobs, paper reports, lab); ``interventions/`` imports nothing from ``sinkscope/``; no
first-party module imports, directly or through others, a module that imports it back. The
test reads the import statements themselves (every depth, function bodies included), so a
lazy import inside a function cannot smuggle a dependency back up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("circuits", "interventions", "sinkscope")
#: what each package must never import
FORBIDDEN = {"circuits": ("interventions", "sinkscope"), "interventions": ("sinkscope",), "sinkscope": ()}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_modules(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, inside a function) for every import statement of ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((child.lineno, alias.name, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                # "from circuits import anatomy" imports circuits.anatomy
                for alias in child.names:
                    out.append((child.lineno, f"{child.module}.{alias.name}", nested))
            visit(child, inner)

    visit(tree, False)
    return out


def first_party(name: str, known: dict[str, Path]) -> str | None:
    """The first-party module ``name`` refers to (the longest known prefix), or None."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_downwards(package):
    offences = []
    for name, path in sources().items():
        if name.split(".")[0] != package:
            continue
        for line, target, _ in imported_modules(path):
            if target.split(".")[0] in FORBIDDEN[package]:
                offences.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not offences, f"{package}/ must not import {FORBIDDEN[package]}:\n" + "\n".join(offences)


def test_no_import_cycles_between_modules():
    known = sources()
    graph = {
        name: {t for _, imp, _ in imported_modules(path) if (t := first_party(imp, known)) and t != name}
        for name, path in known.items()
    }
    # a package's __init__ is imported by its submodules implicitly; edges into it are not cycles we police
    cycles = []
    state: dict[str, int] = {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                walk(nxt, stack + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_function_level_import_says_why():
    """A deferred import costs readers a question; the answer (start-up time of the command, a
    heavy or optional dependency) is a comment on the import or on the line above its group."""
    missing = []
    for path in sources().values():
        lines = path.read_text().splitlines()
        nested = sorted({line for line, _, inner in imported_modules(path) if inner})
        for line in nested:
            # walk up over the group of imports (and blank lines) this one belongs to
            i = line - 1
            explained = "#" in lines[i]
            while not explained and i > 0:
                above = lines[i - 1].strip()
                if above.startswith("#"):
                    explained = True
                elif above.startswith(("import ", "from ")) or not above:
                    explained = "#" in above
                    i -= 1
                    continue
                break
            if not explained:
                missing.append(f"{path.relative_to(ROOT)}:{line}: {lines[line - 1].strip()}")
    assert not missing, "function-level imports without a reason (add a short comment, or move them to the top):\n" + "\n".join(missing)
