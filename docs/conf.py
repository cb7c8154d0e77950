"""Sphinx configuration of sinkscope's documentation site (``make docs``).

The pages are Markdown (myst-parser); the executed notebooks of ``docs/notebooks/`` are shown with
their stored outputs (myst-nb, never re-run here: ``make notebooks`` executes them); the API reference
is generated from the docstrings (autodoc + autosummary, stubs under ``api/generated/``, not committed).
The build is offline: no intersphinx inventory is fetched, so references to other projects' types
(torch, numpy, the standard library, ...) are listed in ``nitpick_ignore_regex`` below, and every
reference to sinkscope's own objects must resolve (``-n -W``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

project = "sinkscope"
author = "the sinkscope authors"
copyright = "2026, the sinkscope authors"
release = version = "0.1.0"

extensions = [
    "myst_nb",  # Markdown pages (it loads myst-parser) and notebooks with their stored outputs
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}  # .rst first: autosummary writes its stubs in it
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# ------------------------------------------------------------------------------ Markdown
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "html_image", "attrs_inline"]
myst_heading_anchors = 3
# the reports and notebooks are written for GitHub: a heading may skip a level there
suppress_warnings = ["myst.header"]

# ------------------------------------------------------------------------------ notebooks
nb_execution_mode = "off"  # show the outputs `make notebooks` stored; never execute at build time
nb_output_stderr = "show"
nb_render_markdown_format = "myst"  # a notebook's Markdown outputs (the verdict tables) are GitHub-style tables

# ------------------------------------------------------------------------------ API reference
autosummary_generate = True
autosummary_imported_members = False
autosummary_ignore_module_all = False  # the summary tables list what autodoc documents: a module's __all__
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_class_signature = "separated"
napoleon_google_docstring = True  # the house style: "Args:" and "Returns:" sections
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Class attributes", "params_style"), ("Modes", "params_style")]
napoleon_use_ivar = True  # "Attributes:" as fields: a dataclass field is then described once, by autodoc

# Nitpicky: every cross-reference must resolve. Without network there is no intersphinx inventory,
# so the other projects' names are accepted here by module; a name of circuits, interventions or
# sinkscope that does not resolve still fails the build.
nitpicky = True
_EXTERNAL = [
    # the standard library
    "abc", "argparse", "collections", "concurrent", "contextlib", "dataclasses", "datetime", "enum",
    "contextvars", "functools", "hashlib", "io", "json", "logging", "os", "pathlib", "random", "re",
    "signal", "subprocess", "tempfile", "threading", "types", "typing", "typing_extensions", "zipfile",
    # the scientific stack and the model libraries
    "torch", "numpy", "np", "pandas", "pd", "scipy", "matplotlib", "plt", "transformer_lens",
    "transformers", "safetensors", "gguf", "jaxtyping", "tokenizers", "tqdm", "pyarrow", "platformdirs",
]
nitpick_ignore_regex = [(r"py:.*", rf"{name}(\..*)?") for name in _EXTERNAL] + [
    # jaxtyping annotations (Float[Tensor, "batch pos"]) are rendered as text that Sphinx splits into
    # names: the array types as written in them, and the pieces of the quoted shape string
    ("py:class", r"Tensor|ndarray|Float|Int|Bool|Shaped|Num|Integer"),
    ("py:class", r"'.*|.*'|'"),
    # a TypeVar in a signature (register's T) has no page of its own
    ("py:class", r"interventions\.registry\.T"),
]

# ------------------------------------------------------------------------------ HTML
html_theme = "furo"
html_title = "sinkscope"
html_static_path = ["_static"]
html_extra_path: list[str] = []
html_theme_options = {"navigation_with_keys": True}


# ------------------------------------------------------------------------------ docstring conventions
import re  # noqa: E402

from sphinx.ext import napoleon  # noqa: E402

#: ``|x|`` in a docstring is an absolute value (``|cos(h_t, h_0)|``, ``|value|``), never a reST
#: substitution; outside inline literals it is escaped before the docstring is parsed
_ABSOLUTE = re.compile(r"(?<![\\|\w])\|([^|\s`](?:[^|`]*?[^|\s`])?)\|(?![|\w])")


def _escape_absolute_values(app, what, name, obj, options, lines):
    for i, line in enumerate(lines):
        pieces = line.split("``")  # even pieces are outside inline literals
        lines[i] = "``".join(_ABSOLUTE.sub(r"\\|\1\\|", piece) if k % 2 == 0 else piece for k, piece in enumerate(pieces))


def _google_sections(app, what, name, obj, options, lines):
    """Napoleon's "Args:" / "Returns:" / "Attributes:" sections for functions, classes and modules; an
    attribute's ``#:`` comment is prose (napoleon would read "text (more): rest" as "name (type): ...")."""
    if what not in ("attribute", "data", "property"):
        napoleon._process_docstring(app, what, name, obj, options, lines)


def _python_object(dotted: str):
    """The object a dotted name names in the code (``circuits.analyses.KVMeter._z_hook``), or None."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return None
            obj = getattr(obj, name)
        return obj
    return None


def _resolve_in_code(app, env, node, contnode):
    """Resolve a reference the API pages have no entry of its own for, to a real target.

    1. A bare name (``:class:`InterventionError```, ``:func:`bootstrap_ci```) that exactly one
       documented object has: that object, as Sphinx does for a target written with a leading dot.
    2. A name several documented objects have (``collect_at`` in a docstring a subclass
       inherits): the one on the class's own MRO, nearest first.
    3. A name that exists in the code but has no entry (a helper class a module does not export
       in ``__all__``, a private method a docstring mentions): the nearest documented object
       that holds it (its class, or its module's page).

    A name that is nowhere in the code stays an error, so a renamed function still fails the build."""
    if node.get("refdomain") != "py":
        return None
    from sphinx.util.nodes import make_refnode

    domain = env.get_domain("py")
    target = node["reftarget"].lstrip("~")
    modname, classname = node.get("py:module"), node.get("py:class")

    def link(name):
        obj = domain.objects.get(name) or domain.modules[name]
        return make_refnode(app.builder, node["refdoc"], obj.docname, obj.node_id, contnode, name)

    matches = domain.find_obj(env, modname, classname, target, node["reftype"], 1)
    if len(matches) == 1:
        return link(matches[0][0])
    if len(matches) > 1 and modname and classname:
        cls = _python_object(f"{modname}.{classname}")
        for base in getattr(cls, "__mro__", ()):
            name = f"{base.__module__}.{base.__qualname__}.{target}"
            if any(name == m[0] for m in matches):
                return link(name)
        return None
    if matches:
        return None
    scopes = [target] if "." in target else []
    if modname and classname:
        scopes.append(f"{modname}.{classname}.{target}")
    if modname:
        scopes.append(f"{modname}.{target}")
    for dotted in scopes:
        if _python_object(dotted) is None:
            continue
        holder = dotted
        while "." in holder:
            holder = holder.rsplit(".", 1)[0]
            if holder in domain.objects or holder in domain.modules:
                return link(holder)
    return None


def setup(app):
    # napoleon is loaded for its settings and the fields it adds; its docstring hook is replaced by
    # _google_sections, which skips attributes
    for listener in list(app.events.listeners.get("autodoc-process-docstring", [])):
        if listener.handler is napoleon._process_docstring:
            app.disconnect(listener.id)
    app.connect("autodoc-process-docstring", _escape_absolute_values, priority=400)
    app.connect("autodoc-process-docstring", _google_sections, priority=450)
    app.connect("missing-reference", _resolve_in_code)
